"""THE rollout path: tasks -> prompts -> the one sampler -> one record per (task, sample), and the
replay of recorded trajectories with gradient. `onpolicy eval`, `onpolicy bench` and the RL stages
(3: constrained-order distillation, 4: on-policy) all decode through `decode_tasks`.

    decoded = decode_tasks(model, tokenizer, tasks, SamplerConfig(threshold=0.9), samples=4, seed=0)
    texts = [r.completion for r in decoded.rollouts]          # what the verifier runs
    logp = replay_logprobs(model, [r.trajectory for r in decoded.rollouts], special)  # with gradient

Seeds: sample s of task i draws from `rollout_seed(seed, step, i, s)`, and the sampler gives every
row its own generator, so a record does not depend on the batch it was decoded in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from onpolicy.data.tasks import completion_text, encode_prompt, truncate_completion
from onpolicy.sampling import (
    SamplerConfig,
    TrajectoryRow,
    generate,
    layout,
    left_pad,
    proposal_logits,
    tokens_per_forward,
)
from onpolicy.tokenizer import SpecialTokens
from verifiers.base import Task


@dataclass
class Rollout:
    """One decoded sample of one task."""

    task_index: int  # index into the task list given to decode_tasks
    sample: int  # 0 .. samples-1
    task: Task
    completion: str  # the text run after the task prompt
    trajectory: TrajectoryRow  # replayable record (prompt ids, canvas, commit forwards and log-probs)

    @property
    def n_tokens(self) -> int:
        return len(self.trajectory.tokens)

    @property
    def forwards(self) -> int:
        return self.trajectory.forwards


@dataclass
class Decoded:
    rollouts: list[Rollout] = field(default_factory=list)
    seconds: float = 0.0  # wall-clock time inside the sampler
    model_seconds: float = 0.0  # of which inside model forwards
    remasked: int = 0  # tokens re-opened by self-correction (SamplerConfig.remask_threshold)

    @property
    def tokens(self) -> int:
        return sum(r.n_tokens for r in self.rollouts)

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward([r.n_tokens for r in self.rollouts], [r.forwards for r in self.rollouts])

    @property
    def forwards_per_token(self) -> float:
        return 1.0 / self.tokens_per_forward if self.tokens_per_forward else float("inf")


def rollout_seed(seed: int, step: int, task_index: int | tuple, sample: int) -> int:
    """The sampling seed of one (run seed, training step, task, sample): a hash, independent of batching."""
    digest = hashlib.sha256(repr((seed, step, task_index, sample)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def decode_tasks(model, tokenizer, tasks: list[Task], sampler_cfg: SamplerConfig, samples: int = 1,
                 seed: int = 0, batch_size: int = 8, chat: bool = False, step: int = 0,
                 keys: list | None = None, progress: Callable[[int], None] | None = None,
                 on_batch: Callable[[list[Rollout]], None] | None = None) -> Decoded:
    """Decode `samples` completions of every task through the one sampler, in batches of `batch_size`
    rows. Records come back in (task, sample) order; `on_batch` sees each batch's records as soon as
    they exist (the on-policy stage starts verifying them while the next batch decodes). `keys` replace the
    task positions in the seeds (a task decoded in another call of the same step gets other draws)."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    encoded = [encode_prompt(tokenizer, t.prompt, chat) for t in tasks]
    jobs = [(i, s) for i in range(len(tasks)) for s in range(samples)]
    out = Decoded()
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        traj = generate(model, [encoded[i][0] for i, _ in chunk], special, sampler_cfg,
                        seeds=[rollout_seed(seed, step, keys[i] if keys else i, s) for i, s in chunk])
        new = []
        for row, (i, s) in enumerate(chunk):
            record = traj.row(row)
            if not chat:
                record.verified = verified_length(tokenizer, record.tokens, encoded[i][1], record.finished)
            new.append(Rollout(i, s, tasks[i], completion_text(tokenizer, record.tokens, encoded[i][1], chat),
                               record))
        out.rollouts += new
        if on_batch:
            on_batch(new)
        out.seconds += traj.seconds
        out.model_seconds += traj.model_seconds
        out.remasked += traj.remasked
        if progress:
            progress(len(chunk))
    return out


def verified_length(tokenizer, tokens: list[int], held_back: str, finished: bool) -> int:
    """How many canvas positions the verdict covers: the tokens up to and including the one where
    `truncate_completion` cuts (the token that starts the next top-level statement), or, uncut, every
    token and the EOS that ended them. Positions past it were decoded but never run; stage 4 trains none
    of them."""
    text = tokenizer.decode(tokens).removeprefix(held_back)
    kept = len(truncate_completion(text))
    if kept == len(text):
        return len(tokens) + int(finished)
    lo, hi = 1, len(tokens)  # the fewest tokens whose text reaches past the cut
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(tokens[:mid]).removeprefix(held_back)) > kept:
            hi = mid
        else:
            lo = mid + 1
    return lo


def reference_trajectory(tokenizer, task: Task, block_size: int, max_new_tokens: int,
                         generator: torch.Generator) -> TrajectoryRow | None:
    """The task's reference solution as a trajectory the replay can read, committed in a random order
    within each block (one token per step): what a block-diffusion sampler could have done to write it.
    Its replayed states are the masked-diffusion corruptions of the reference at every mask ratio of a
    block, so the jump term on them is a supervised denoising loss on ground truth (stage 4's anchor).
    None when the task has no reference or it does not fit in `max_new_tokens`."""
    if not task.canonical_solution:
        return None
    special = SpecialTokens.from_tokenizer(tokenizer)
    prompt, held_back = encode_prompt(tokenizer, task.prompt)  # plain continuation, as stage 4 decodes
    ids = tokenizer(held_back + task.canonical_solution, add_special_tokens=False)["input_ids"]
    if len(ids) >= max_new_tokens:
        return None
    n = len(ids) + 1  # the solution and its EOS; the rest of the last block stays uncommitted
    width = -(-n // block_size) * block_size
    canvas = torch.full((width,), special.eos, dtype=torch.long)
    canvas[: len(ids)] = torch.tensor(ids)
    commit_forward = torch.zeros(width, dtype=torch.long)
    for start in range(0, n, block_size):
        span = min(block_size, n - start)
        commit_forward[start : start + span] = start + 1 + torch.randperm(span, generator=generator)
    return TrajectoryRow(prompt, canvas, commit_forward, torch.zeros(width), forwards=n, seed=0,
                         finished=True, tokens=ids, block_size=block_size, canvas_len=width)


# ---------------------------------------------------------------------------------------------
# Replay: what the model saw at each step, recomputed with gradient.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Packed:
    prompt: torch.Tensor  # [B, P] left-padded
    prompt_valid: torch.Tensor  # [B, P]
    canvas: torch.Tensor  # [B, G] right-padded
    valid: torch.Tensor  # [B, G]
    step_index: torch.Tensor  # [B, G] the step (0-based) that committed each position, -1 = none
    block: int


def _pack(rows: list[TrajectoryRow], special: SpecialTokens, mode: str, device) -> _Packed:
    """Rows (possibly from different generate calls) as one padded batch, with each committed position's
    step index: within its block for block_causal (every block's j-th step is replayed by one
    forward), within the row for bidirectional and causal."""
    for r in rows:
        r.check_replayable()
    blocks = {r.block_size for r in rows}
    if len(blocks) != 1:
        raise ValueError(f"rows decoded with different block sizes {sorted(blocks)} cannot be replayed "
                         "together")
    block = blocks.pop()
    if mode == "bidirectional":
        lengths = {r.canvas_len for r in rows}
        if len(lengths) != 1:
            raise ValueError("bidirectional rows must share the canvas length they were decoded with")
        width = lengths.pop()  # the model saw the whole canvas, blocks not yet reached as MASK
    else:
        width = max(len(r.canvas) for r in rows)
    width = max(width, block)
    prompt, prompt_valid = left_pad([r.prompt for r in rows], special.pad, device)
    canvas = torch.full((len(rows), width), special.mask, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    forward = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.canvas)
        canvas[i, :n], forward[i, :n] = r.canvas, r.commit_forward
        valid[i, : (width if mode == "bidirectional" else n)] = True
    committed = forward > 0
    if mode == "block_causal":
        by_block = forward.view(len(rows), -1, block)  # [B, n_blocks, block]
        first = torch.where(by_block > 0, by_block, torch.iinfo(torch.long).max).min(-1, keepdim=True).values
        step = (by_block - first).view(len(rows), -1)
    else:  # a row's forwards are 1, 2, ... (causal: one per token; bidirectional: one per step)
        first = torch.where(committed, forward, torch.iinfo(torch.long).max).min(-1, keepdim=True).values
        step = forward - first
    step = torch.where(committed, step, -1)
    return _Packed(prompt, prompt_valid, canvas.to(device), valid.to(device), step.to(device), block)


@dataclass
class ReplayStep:
    """The model's view of one step index j of a batch of recorded trajectories."""

    index: int | torch.Tensor  # j; or [B, G], each position's block's own j (`replay_sampled_states`)
    logits: torch.Tensor | None  # [B, G, V] proposal logits of the canvas positions in the state before step
    # j
    now: torch.Tensor  # [B, G] bool: positions committed at step j
    step_index: torch.Tensor  # [B, G] the step (0-based, within the block for block_causal) of every
    # position, -1 = none
    canvas: torch.Tensor  # [B, G] the final tokens
    block: int


def _model_inputs(p: _Packed) -> dict:
    """Attention mask, positions and block ids of prompt + canvas, the same for every replayed state."""
    prompt_pos, prompt_blocks, gen_pos, gen_blocks = layout(p.prompt_valid, p.canvas.shape[1], p.block)
    return {"attention_mask": torch.cat([p.prompt_valid, p.valid], 1),
            "position_ids": torch.cat([prompt_pos, gen_pos], 1),
            "block_ids": torch.cat([prompt_blocks, gen_blocks], 1)}


def _state_logits(model, p: _Packed, shown: torch.Tensor, mode: str, special: SpecialTokens) -> torch.Tensor:
    """Proposal logits of the canvas positions with `shown` ([B, G] bool) committed and the rest masked.
    block_causal: the BD3 training layout, noisy canvas then clean canvas: each block's noisy copy reads
    earlier blocks from the clean copy, which is exactly what the KV cache held at sampling time."""
    ids = torch.cat([p.prompt, torch.where(shown, p.canvas, special.mask)], 1)
    extra = {"clean_input_ids": torch.cat([p.prompt, p.canvas], 1)} if mode == "block_causal" else {}
    logits = model(input_ids=ids, **_model_inputs(p), **extra).logits
    return proposal_logits(logits[:, p.prompt.shape[1] :], special)


def replay_step_logits(model, rows: list[TrajectoryRow], special: SpecialTokens) -> Iterator[ReplayStep]:
    """For every step index j: the logits the model gives the canvas positions in the state before step
    j, and which positions step j committed (see ReplayStep). Logits are the sampler's proposal logits
    (noise token and padding excluded), with gradient if enabled.

    block_causal: one forward per step index for every block at once (block b's noisy copy holds its
    state before its j-th step; `_state_logits`). bidirectional: one forward per step over the whole
    canvas. causal: one teacher-forced forward (position t - 1 predicts t)."""
    mode = getattr(model, "module", model).config.attention  # a DeepSpeed engine keeps its model in .module
    device = next(model.parameters()).device
    p = _pack(rows, special, mode, device)
    if mode == "causal":
        logits = model(input_ids=torch.cat([p.prompt, p.canvas], 1), **_model_inputs(p)).logits
        p_len = p.prompt.shape[1]
        yield ReplayStep(0, proposal_logits(logits[:, p_len - 1 : -1], special), p.step_index >= 0,
                         p.step_index, p.canvas, p.block)
        return
    for st in _steps(p):
        st.logits = _state_logits(model, p, (p.step_index >= 0) & (p.step_index < st.index), mode, special)
        yield st


def replay_masks(rows: list[TrajectoryRow], special: SpecialTokens, mode: str) -> Iterator[ReplayStep]:
    """`replay_step_logits`' steps without the model (`logits` None): which positions each step committed,
    for counting a step's loss terms before any forward."""
    p = _pack(rows, special, mode, torch.device("cpu"))
    if mode == "causal":
        yield ReplayStep(0, None, p.step_index >= 0, p.step_index, p.canvas, p.block)
        return
    yield from _steps(p)


def _steps(p: _Packed) -> Iterator[ReplayStep]:
    for j in range(int(p.step_index.max()) + 1):
        yield ReplayStep(j, None, p.step_index == j, p.step_index, p.canvas, p.block)


def replay_sampled_states(model, rows: list[TrajectoryRow], special: SpecialTokens,
                          generator: torch.Generator) -> ReplayStep:
    """One forward for a batch of block-causal trajectories: each block at one of its own recorded states,
    drawn uniformly from its steps (seeded by `generator`). A sample of `replay_step_logits`' states at
    1 / (steps per block) of its cost, for terms that read a state's logits but not every step's
    commits (the jump distillation of rows that carry no policy gradient). `index` is [B, G]: each
    position's block's drawn j."""
    mode = getattr(model, "module", model).config.attention
    if mode != "block_causal":
        raise ValueError("replay_sampled_states needs block_causal attention (each block its own state), "
                         f"not {mode}")
    p = _pack(rows, special, mode, next(model.parameters()).device)
    by_block = p.step_index.view(len(rows), -1, p.block)
    n_steps = by_block.max(-1).values + 1  # [B, n_blocks], 0 for a block with nothing committed
    j = (torch.rand(n_steps.shape, generator=generator) * n_steps.cpu()).long().to(n_steps.device)
    index = j.repeat_interleave(p.block, 1)  # [B, G]
    shown = (p.step_index >= 0) & (p.step_index < index)
    return ReplayStep(index, _state_logits(model, p, shown, mode, special), p.step_index == index,
                      p.step_index, p.canvas, p.block)


def final_token_logprob(logp_all: torch.Tensor, step: ReplayStep) -> torch.Tensor:
    """log p(final token | the state before step j) at every canvas position: [B, G, V] log-softmax of
    `step.logits` -> [B, G]. The one per-step log-likelihood: stage 4 weights it by advantages at the
    positions step j committed (and its progress surrogate reads it where tokens are still masked),
    stage 3 distills it (`committed_logprob`)."""
    return logp_all.gather(-1, step.canvas[..., None])[..., 0]


def committed_logprob(logp_all: torch.Tensor, step: ReplayStep) -> torch.Tensor:
    """`final_token_logprob` at the positions step j committed, 0 elsewhere: [B, G]."""
    return final_token_logprob(logp_all, step).masked_fill(~step.now, 0.0)


def replay_logprobs(model, rows: list[TrajectoryRow],
                    special: SpecialTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(committed token | state before its step) for every canvas position: ([B, G] float, with
    gradient; bool [B, G] committed positions). Equals the sampler's `commit_logprob` when the
    weights are those that decoded (the importance ratio of the on-policy stage starts at 1)."""
    total, mask = None, None
    for step in replay_step_logits(model, rows, special):
        logp = committed_logprob(step.logits.float().log_softmax(-1), step)  # [B, G]
        total = logp if total is None else total + logp
        mask = step.now if mask is None else mask | step.now
    return total, mask


# ---------------------------------------------------------------------------------------------
# Verification in the background: a crashing or hanging verifier costs its samples, never the run.
# ---------------------------------------------------------------------------------------------


class VerifierPool:
    """Runs `verifier.verify` on chunks of rollouts in a background thread, so the sandbox works while the
    sampler decodes the next batch. `results()` waits for every chunk and returns one Verdict per
    rollout, in order. A chunk whose call raises, returns the wrong number of verdicts, or runs past
    `timeout_s` comes back as status "excluded" with the reason. A hung call keeps its (daemon) thread,
    which can never be killed; the chunks queued behind it move to a fresh thread, so the run waits at
    most the timeout per chunk and exits normally.
    """

    def __init__(self, verifier, timeout_s: float = 120.0):
        self.verifier, self.timeout_s = verifier, timeout_s
        self._jobs: list[dict] = []
        self._queue = self._start_worker()

    def _start_worker(self):
        import queue
        import threading

        jobs: queue.Queue = queue.Queue()

        def work() -> None:
            while True:
                job = jobs.get()
                try:
                    job["result"] = self.verifier.verify(job["tasks"], job["completions"])
                except Exception as e:  # reported by results(), with the reason
                    job["error"] = e
                job["done"].set()

        threading.Thread(target=work, name="verify", daemon=True).start()
        return jobs

    def submit(self, rollouts: list[Rollout]) -> None:
        self._put([r.task for r in rollouts], [r.completion for r in rollouts])

    def _put(self, tasks: list[Task], completions: list[str]) -> None:
        import threading

        job = {"tasks": tasks, "completions": completions, "done": threading.Event()}
        self._jobs.append(job)
        self._queue.put(job)

    def results(self) -> list:
        import queue

        from verifiers.base import Verdict

        def excluded(tasks, why):
            return [Verdict(t.task_id, False, 0.0, "excluded", why, 0.0) for t in tasks]

        out = []
        for job in self._jobs:
            # a verifier that knows its programs' own timeouts gets at least that long: programs that hang
            # are failures (status "timeout"), not a verifier that broke
            worst = getattr(self.verifier, "worst_case_seconds", None)
            wait = max(self.timeout_s, worst(len(job["tasks"]))) if callable(worst) else self.timeout_s
            if not job["done"].wait(wait):
                out += excluded(job["tasks"], f"verifier timeout after {wait:g} s")
                stuck, self._queue = self._queue, self._start_worker()  # later chunks move to a fresh thread
                while True:
                    try:
                        self._queue.put(stuck.get_nowait())
                    except queue.Empty:
                        break
            elif "error" in job:
                e = job["error"]
                out += excluded(job["tasks"], f"verifier raised {type(e).__name__}: {e}")
            elif len(job["result"]) != len(job["tasks"]):
                out += excluded(job["tasks"],
                                f"verifier returned {len(job['result'])} verdicts for {len(job['tasks'])} "
                                "completions")
            else:
                out += job["result"]
        self._jobs = []
        return out

    def verify(self, tasks: list[Task], completions: list[str]) -> list:
        """The Verifier protocol, with this pool's protection (for evaluation inside a training run)."""
        self._put(list(tasks), list(completions))
        return self.results()

    def close(self) -> None:
        """Nothing to join: worker threads are daemons and idle ones block on an empty queue."""


def excluded_reason(detail: str) -> str:
    """A short key for metrics: 'verifier timeout', 'verifier raised ValueError', 'sandbox failure', ..."""
    head = detail.split(":")[0].strip()
    return head.split(" after ")[0][:40] or "unknown"
