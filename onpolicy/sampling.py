"""THE sampler: block-wise parallel denoising with an exact KV cache (docs/method.md, inference).

Blocks of `block_size` tokens are generated left to right. Inside a block, every step runs the model
on the block (given the prefix) and commits some of its masked positions: the most confident ones,
either every position above `threshold` (at least one per step) or an even share of the block per
step so that it finishes in `steps_per_block` steps. A sequence stops after the block in which it
commits EOS.

- block_causal models: the prompt and finished blocks sit in a KV cache; a block attends to the
  cache and to itself. That is the mask the model was trained with (BD3-LM), so the cache is
  exact: with or without it, the logits are the same.
- bidirectional models: no cache is possible (earlier tokens attend to later ones); every step runs
  the whole canvas [prompt | generated | still masked]. block_size defaults to the whole canvas.
- causal models (the AR baseline): block size 1; the logits of the last committed token predict the
  next one, so each token costs exactly one cached forward.

Forwards: with the cache, a finished block (and first the prompt) enters the KV cache in the same
forward as the next block's first step (as Fast-dLLM does), so a block of k steps costs k forwards;
a causal model costs one forward per token. Each row counts its own forwards (those it would have
run decoded alone), and every commit records the row's forward that made it.

Prompts of different lengths share a batch by left padding; positions skip the padding, and each
row draws from its own seeded generator, so a row decodes the same alone or in a batch (greedy or
sampled). The returned `Trajectory` is replayable: `replay_states` rebuilds the state before every
step, and `onpolicy.rollout.replay_logprobs` recomputes the commits' log-probabilities with gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .special_tokens import SpecialTokens  # relative: an exported model folder carries this file


@dataclass
class SamplerConfig:
    """How to decode. Defaults: one token per step, greedy, cached."""

    max_new_tokens: int = 128  # canvas length after the prompt
    block_size: int | None = None  # None: the model's block size (block_causal), whole canvas (bidirectional)
    steps_per_block: int | None = None  # fixed steps per block; None = block_size (one token per step)
    threshold: float | None = None  # commit every masked position with confidence >= threshold (>= 1 per
    # step)
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # sample among the k most likely tokens (temperature > 0)
    top_p: float | None = None  # nucleus sampling (temperature > 0)
    remask_threshold: float | None = None  # self-correction: re-open a committed token of the current
    #                                        block when its probability falls below this and the model prefers
    #                                        another
    max_steps_per_block: int | None = None  # step budget per block with self-correction (default 2 x block)
    commit_temperature: float | None = None  # with threshold: soft commits, each open position commits with
    #                                          probability sigmoid((top prob - threshold) / this) (on-policy
    #                                          rollouts)
    use_cache: bool = True  # exact KV cache of finished blocks (block_causal and causal models)
    per_row: bool = True  # with the cache: each row at its own block, done rows leave (False: the batch in
    # lock-step)
    stop_at_eos: bool = True  # stop a sequence after the block in which it commits EOS

    def __post_init__(self) -> None:
        """Impossible settings are refused by name, before any decoding."""
        from .errors import ConfigError

        for key in ("max_new_tokens", "block_size", "steps_per_block", "max_steps_per_block", "top_k"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"sampler: {key}={value} must be >= 1")
        # probabilities compared against (above 1: always/never)
        for key in ("threshold", "remask_threshold"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"sampler: {key}={value} must be >= 0")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampler: top_p={self.top_p} must be in (0, 1]")
        if self.temperature < 0 or (self.commit_temperature is not None and self.commit_temperature <= 0):
            raise ConfigError("sampler: temperature must be >= 0 and commit_temperature > 0")


@dataclass
class TrajectoryRow:
    """One decoded row: everything needed to rebuild what the model saw at every step."""

    prompt: list[int]  # the prompt ids (no padding)
    canvas: torch.Tensor  # [G] long: the decoded canvas up to the end of its last block (EOS block included)
    commit_forward: torch.Tensor  # [G] long: the row's own forward (1-based) that committed each position
    commit_logprob: torch.Tensor  # [G] float: log p(token) under the model at commit time (temperature 1)
    forwards: int  # forwards this row needed (prompt and cache writes included)
    seed: int  # the seed of this row's sampling generator
    finished: bool  # emitted EOS
    tokens: list[int]  # generated ids, cut before the first EOS (and at max_new_tokens)
    block_size: int
    canvas_len: int  # the full canvas length of the call (bidirectional models see all of it)
    replayable: bool = True  # False when self-correction re-opened tokens (replay would not be exact)
    behaviour_logprob: torch.Tensor | None = None  # [G] log p(token) under the distribution it was drawn from
    # (temperature, top-k, top-p: `behaviour_logp`); None for greedy tokens (no draw: commit_logprob stands
    # in)
    verified: int | None = None  # canvas positions the verdict covers (the rest was cut by a stop sequence);
    # None: all

    TENSORS = {"canvas": torch.long, "commit_forward": torch.long, "commit_logprob": torch.float,
               "behaviour_logprob": torch.float}

    def to_json(self) -> dict:
        """Plain lists and numbers (a trajectory pool's lines, stage 4's buffer in a checkpoint)."""
        return {k: v.tolist() if torch.is_tensor(v) else v for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> TrajectoryRow:
        return cls(**{k: torch.tensor(v, dtype=cls.TENSORS[k]) if k in cls.TENSORS and v is not None else v
                      for k, v in data.items()})

    def check_replayable(self) -> None:
        if not self.replayable:
            raise ValueError("self-correction (remask_threshold) re-opened tokens in this trajectory, which "
                             "its record does "
                             "not keep: it cannot be replayed exactly (decode without it where replay is "
                             "needed)")


@dataclass
class Trajectory:
    """What one `generate` call did; `row(i)` gives a row's own record."""

    prompts: list[list[int]]
    canvas: torch.Tensor  # [B, G] the whole canvas (positions never decoded hold EOS or MASK)
    commit_forward: torch.Tensor  # [B, G] long, 0 = never committed
    commit_logprob: torch.Tensor  # [B, G] float
    row_forwards: list[int]  # per row: its own forward count
    row_lengths: list[int]  # per row: end of its last decoded block
    seeds: list[int]
    tokens: list[list[int]]  # per row, cut before the first EOS
    finished: list[bool]
    block_size: int
    forwards: int  # forwards the batch ran (a row's own count is in row_forwards)
    seconds: float = 0.0  # wall-clock time of the whole call
    model_seconds: float = 0.0  # of which inside model forwards (the rest is sampler overhead)
    remasked: int = 0  # tokens re-opened by self-correction
    self_correcting: bool = False
    # record_states=True: per batch step, (canvas before the step [B, G], rows that stepped
    # [B], logits [B, block, V])
    states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    behaviour_logprob: torch.Tensor | None = None  # [B, G] float, sampled tokens only (temperature > 0)

    def row(self, i: int) -> TrajectoryRow:
        n = self.row_lengths[i]
        behaviour = None if self.behaviour_logprob is None else self.behaviour_logprob[i, :n].clone()
        return TrajectoryRow(self.prompts[i], self.canvas[i, :n].clone(), self.commit_forward[i, :n].clone(),
                             self.commit_logprob[i, :n].clone(), self.row_forwards[i], self.seeds[i],
                             self.finished[i], self.tokens[i], self.block_size, self.canvas.shape[1],
                             not self.self_correcting, behaviour)

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward([len(t) for t in self.tokens], self.row_forwards)

    @property
    def overhead_fraction(self) -> float:
        return 1.0 - self.model_seconds / self.seconds if self.seconds > 0 else 0.0


def tokens_per_forward(tokens: list[int], forwards: list[int]) -> float:
    """THE speed measure: generated tokens before EOS / the rows' own forwards (prompt and cache
    writes included), summed over rows. Its inverse is forwards per token."""
    return sum(tokens) / max(1, sum(forwards))


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch: ids [B, P] padded on the left, and which are real."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, device=device)
            valid[i, width - len(p) :] = True
    return ids, valid


def layout(prompt_valid: torch.Tensor, gen_len: int, block: int) -> tuple[torch.Tensor, ...]:
    """Positions and block ids of a left-padded prompt [B, P] and a canvas of gen_len tokens.

    Generated blocks are numbered 0, 1, ... from the end of each prompt; the prompt's own tokens fall
    in blocks < 0 (floor division), so every row's first block starts right after its prompt. The
    sampler and the replay share this, so they place every token identically.
    Returns prompt_pos, prompt_blocks [B, P], gen_pos, gen_blocks [B, G].
    """
    device = prompt_valid.device
    prompt_pos = (prompt_valid.long().cumsum(1) - 1).clamp(min=0)
    lengths = prompt_valid.sum(1)
    prompt_blocks = torch.div(prompt_pos - lengths[:, None], block, rounding_mode="floor")
    gen_pos = lengths[:, None] + torch.arange(gen_len, device=device)
    gen_blocks = torch.arange(gen_len, device=device).div(block, rounding_mode="floor")
    gen_blocks = gen_blocks.expand(prompt_valid.shape[0], -1)
    return prompt_pos, prompt_blocks, gen_pos, gen_blocks


def proposal_logits(logits: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """The model's logits with the noise token and padding excluded (never proposed, never scored):
    the distribution the sampler commits from and the replay scores. A new float tensor."""
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[[special.mask, special.pad]] = True
    # the most negative finite float, not -inf: probability exactly 0, yet p * log p stays 0 (not NaN) in
    # the entropy terms of the losses, forward and backward
    return logits.float().masked_fill(banned, torch.finfo(torch.float32).min)


def behaviour_logp(logp: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """log-probabilities of the distribution the sampler draws tokens from: [..., V] -> [..., V]. logp at
    temperature 0 (greedy: nothing is drawn); else logp / temperature, filtered by top-k and top-p,
    renormalised. The on-policy stage's token term reads it on both sides of its importance ratio."""
    if cfg.temperature <= 0:
        return logp
    scaled = logp / cfg.temperature
    low = torch.finfo(scaled.dtype).min  # not -inf: a filtered token's gradient stays finite
    if cfg.top_k is not None:
        kth = scaled.topk(min(cfg.top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, low)
    if cfg.top_p is not None:
        sorted_logits, order = scaled.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, low))
    return scaled.log_softmax(-1)


def _propose(logp: torch.Tensor, cfg: SamplerConfig, generators: list[torch.Generator | None],
             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Candidate token, its confidence, its log-probability and its behaviour log-probability (None when
    greedy): [B, L, V] -> [B, L] x 4.

    logp: the proposal distribution's log-probabilities (`proposal_logits(...).log_softmax(-1)`).

    Confidence is the model's own probability of the candidate (temperature 1, unfiltered), so the
    commit order does not depend on how the candidate was drawn. With temperature > 0 each row in
    `rows` (bool [B]: rows that step now) draws from `behaviour_logp` with its own generator, so its
    samples do not depend on its batch-mates; other rows draw nothing.
    """
    behaviour = None
    if cfg.temperature <= 0:
        token = logp.argmax(-1)
    else:
        full = behaviour_logp(logp, cfg)
        draw = full.exp().cpu()
        token = torch.zeros(logp.shape[:2], dtype=torch.long)
        for i in rows.nonzero().flatten().tolist():
            token[i] = torch.multinomial(draw[i], 1, generator=generators[i])[:, 0]
        token = token.to(logp.device)
        behaviour = full.gather(-1, token[..., None])[..., 0]
    token_logp = logp.gather(-1, token[..., None])[..., 0]
    return token, token_logp.exp(), token_logp, behaviour


def _commit_mask(conf: torch.Tensor, open_: torch.Tensor, n_steps_left: int,
                 threshold: float | None) -> torch.Tensor:
    """Which open positions to commit this step: bool [B, L]. conf: [B, L]; open_: [B, L] still masked."""
    conf = conf.masked_fill(~open_, -1.0)
    n_open = open_.sum(-1)  # [B]
    if threshold is not None:
        chosen = open_ & (conf >= threshold)
        best = conf.argmax(-1, keepdim=True)  # at least one per step, per sequence with work left
        chosen.scatter_(1, best, open_.gather(1, best) | chosen.gather(1, best))
        return chosen
    k = torch.div(n_open + n_steps_left - 1, n_steps_left, rounding_mode="floor")  # ceil(open / steps left)
    rank = conf.argsort(-1, descending=True).argsort(-1)  # 0 = most confident
    return open_ & (rank < k[:, None])


def _soft_commit_mask(score: torch.Tensor, open_: torch.Tensor, cfg: SamplerConfig, generators,
                      rows: torch.Tensor) -> torch.Tensor:
    """Soft threshold: each open position commits with probability sigmoid((score - threshold) /
    commit_temperature), score = the model's top probability there; if a row draws none, its
    top-scoring open position commits (>= 1 per step). Each stepping row draws from its own generator.
    `onpolicy.diffusion.policy.soft_commit_logprob` scores these decisions."""
    q = torch.sigmoid((score.float() - cfg.threshold) / cfg.commit_temperature).cpu()  # [B, L]
    draw = torch.zeros_like(q, dtype=torch.bool)
    for i in rows.nonzero().flatten().tolist():
        draw[i] = torch.rand(q.shape[1], generator=generators[i]) < q[i]
    chosen = draw.to(open_.device) & open_
    top = score.masked_fill(~open_, -1.0).argmax(-1, keepdim=True)
    fallback = ~chosen.any(-1, keepdim=True) & open_.gather(1, top)
    return chosen.scatter(1, top, chosen.gather(1, top) | fallback)


def _block_size(model, cfg: SamplerConfig) -> int:
    mode = model.config.attention
    if mode == "causal":
        return 1
    if cfg.block_size is not None:
        return cfg.block_size
    return model.config.block_size if mode == "block_causal" else cfg.max_new_tokens


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    special: SpecialTokens,
    cfg: SamplerConfig,
    seeds: list[int] | None = None,
    record_states: bool = False,
    slots: int | None = None,
) -> Trajectory:
    """Decode a batch of prompts (token id lists) with the model's own attention mode.

    seeds: one per row (default 0, 1, ...); row i samples from `torch.Generator().manual_seed(seeds[i])`.
    slots: per-row decoding decodes at most this many rows at once; the others wait and take the place
    of rows that finish (default: all rows at once). A row's tokens do not depend on it.
    """
    t_start = time.perf_counter()
    mode = model.config.attention
    device = next(model.parameters()).device
    block = _block_size(model, cfg)
    steps_per_block = cfg.steps_per_block or block
    self_correct = cfg.remask_threshold is not None and mode != "causal"
    max_steps = (cfg.max_steps_per_block or 2 * block) if self_correct else block
    if block < 1 or steps_per_block < 1 or max_steps < 1:
        raise ValueError("block_size, steps_per_block and max_steps_per_block must be >= 1")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    soft = cfg.commit_temperature is not None
    if soft and (cfg.threshold is None or cfg.commit_temperature <= 0):
        raise ValueError("commit_temperature (soft commits) needs a threshold and a positive temperature")
    random = cfg.temperature > 0 or soft
    generators = [torch.Generator().manual_seed(s) for s in seeds] if random else [None] * len(prompts)
    n_blocks = -(-cfg.max_new_tokens // block)
    gen_len = n_blocks * block

    prompt, prompt_valid = left_pad(prompts, special.pad, device)  # [B, P]
    batch, p_len = prompt.shape
    prompt_pos, prompt_blocks, gen_pos, gen_blocks = layout(prompt_valid, gen_len, block)

    canvas = torch.full((batch, gen_len), special.mask, dtype=torch.long, device=device)  # [B, G]
    commit_forward = torch.zeros((batch, gen_len), dtype=torch.long, device=device)
    commit_logprob = torch.zeros((batch, gen_len), dtype=torch.float, device=device)
    behaviour_logprob = torch.zeros_like(commit_logprob) if cfg.temperature > 0 else None
    row_fwd = torch.zeros(batch, dtype=torch.long, device=device)  # each row's own forward count
    row_len = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stats = {"forwards": 0, "model_s": 0.0, "remasked": 0}
    states = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(rows: torch.Tensor, **kw):
        """One model call; `rows` (bool [B]) are the rows that needed it."""
        sync()
        tic = time.perf_counter()
        out = model(**kw)
        sync()
        stats["model_s"] += time.perf_counter() - tic
        stats["forwards"] += 1
        row_fwd.add_(rows.long())
        return out

    cached = cfg.use_cache and mode in ("block_causal", "causal")
    keep = {"logits_to_keep": 1} if mode == "causal" else {}  # a causal decoder reads only the last logits
    full_valid = torch.cat([prompt_valid, torch.ones_like(canvas, dtype=torch.bool)], 1)
    full_pos, full_blocks = torch.cat([prompt_pos, gen_pos], 1), torch.cat([prompt_blocks, gen_blocks], 1)
    # one row alone gains nothing from per-row bookkeeping: the lock-step loop decodes it the same, faster
    per_row = (cached and cfg.per_row and not self_correct and hasattr(model, "allocate_cache")
               and len(prompts) > 1)
    if per_row:
        tensors = {"canvas": canvas, "commit_forward": commit_forward, "commit_logprob": commit_logprob,
                   "behaviour_logprob": behaviour_logprob, "row_fwd": row_fwd, "row_len": row_len,
                   "done": done}
        decoder = _RowDecoder(model, prompts, special, cfg, generators, block, steps_per_block, gen_len,
                              slots, tensors)
        decoder.run(forward, states if record_states else None)
    else:  # lock-step: the batch works on one block at a time
        cache, next_logits = None, None
        # Tokens waiting to enter the cache (ids, valid, positions, blocks): first the prompt, then each
        # finished block. They ride along with the next forward the block needs anyway.
        pending = (prompt, prompt_valid, prompt_pos, prompt_blocks) if cached else None
        if cached:
            cache = model.allocate_cache(p_len + gen_len) if hasattr(model, "allocate_cache") else None
        if cached and mode == "causal":  # the prompt's forward predicts the first token
            out = forward(torch.ones_like(done), input_ids=prompt, attention_mask=prompt_valid,
                          position_ids=prompt_pos, block_ids=prompt_blocks, past_key_values=cache,
                          use_cache=True, **keep)
            cache, next_logits, pending = out.past_key_values, out.logits[:, -1:], None

        for b in range(n_blocks):
            sl = slice(b * block, (b + 1) * block)
            canvas[done, sl] = special.eos  # finished sequences only pad out the batch
            row_len[~done] = sl.stop
            for step in range(max_steps):  # every step commits >= 1 token per open sequence
                open_ = canvas[:, sl] == special.mask  # [B, block]
                stepping = ~done & (open_.any(1) | self_correct)  # [B] rows that need this forward
                if not stepping.any():
                    break
                if mode == "causal":
                    if cached:
                        logits = next_logits
                    else:
                        end = p_len + sl.start
                        logits = forward(stepping, input_ids=torch.cat([prompt, canvas], 1)[:, :end],
                                         attention_mask=full_valid[:, :end], position_ids=full_pos[:, :end],
                                         **keep).logits[:, -1:]
                elif cached and pending is not None:  # cache write + this block's first step, one forward
                    ids, valid, pos, blk = pending
                    block_valid = full_valid[:, p_len + sl.start : p_len + sl.stop]
                    out = forward(stepping, input_ids=torch.cat([ids, canvas[:, sl]], 1),
                                  attention_mask=torch.cat([valid, block_valid], 1),
                                  position_ids=torch.cat([pos, gen_pos[:, sl]], 1),
                                  block_ids=torch.cat([blk, gen_blocks[:, sl]], 1), past_key_values=cache,
                                  use_cache=True, cache_len=ids.shape[1])
                    cache, pending = out.past_key_values, None
                    logits = out.logits[:, ids.shape[1] :]
                elif cached:
                    logits = forward(stepping, input_ids=canvas[:, sl], position_ids=gen_pos[:, sl],
                                     block_ids=gen_blocks[:, sl], past_key_values=cache).logits
                else:
                    logits = forward(stepping, input_ids=torch.cat([prompt, canvas], 1),
                                     attention_mask=full_valid, position_ids=full_pos,
                                     block_ids=full_blocks).logits[:, p_len + sl.start : p_len + sl.stop]
                if record_states:
                    states.append((canvas.clone().cpu(), stepping.clone().cpu(), logits.float().cpu()))
                dist = proposal_logits(logits, special).log_softmax(-1)  # [B, block, V], once per step
                token, conf, logp, b_logp = _propose(dist, cfg, generators, stepping)  # [B, block] x 4
                open_ = open_ & stepping[:, None]
                last_step = step == max_steps - 1
                if self_correct and not last_step:
                    current = canvas[:, sl]
                    p_current = dist.gather(-1, current[..., None])[..., 0].exp()
                    unsure = (p_current < cfg.remask_threshold) & (token != current)
                    reopen = ~open_ & stepping[:, None] & unsure
                    if reopen.any():
                        stats["remasked"] += int(reopen.sum())
                        open_ = open_ | reopen
                    if not open_.any():
                        break
                if last_step:
                    chosen = open_
                elif soft:
                    chosen = _soft_commit_mask(dist.amax(-1).exp(), open_, cfg, generators, stepping)
                else:
                    chosen = _commit_mask(conf, open_, max(1, steps_per_block - step), cfg.threshold)
                canvas[:, sl] = torch.where(chosen, token, canvas[:, sl])
                commit_forward[:, sl] = torch.where(chosen, row_fwd[:, None], commit_forward[:, sl])
                commit_logprob[:, sl] = torch.where(chosen, logp, commit_logprob[:, sl])
                if behaviour_logprob is not None:
                    behaviour_logprob[:, sl] = torch.where(chosen, b_logp, behaviour_logprob[:, sl])
            if cfg.stop_at_eos:
                done |= (canvas[:, : sl.stop] == special.eos).any(1)
            if bool(done.all()) or b == n_blocks - 1:
                break
            # the committed token joins the cache; this forward predicts the next
            if cached and mode == "causal":
                out = forward(~done, input_ids=canvas[:, sl], position_ids=gen_pos[:, sl],
                              block_ids=gen_blocks[:, sl], past_key_values=cache, use_cache=True, **keep)
                cache, next_logits = out.past_key_values, out.logits[:, -1:]
            elif cached:
                pending = (canvas[:, sl], full_valid[:, p_len + sl.start : p_len + sl.stop], gen_pos[:, sl],
                           gen_blocks[:, sl])

    tokens, finished = [], []
    for i in range(batch):
        row = canvas[i, : int(row_len[i])].tolist()
        end = min(row.index(special.eos) if special.eos in row else len(row), cfg.max_new_tokens)
        tokens.append(row[:end])
        finished.append(special.eos in row[: cfg.max_new_tokens])
    return Trajectory(list(map(list, prompts)), canvas.cpu(), commit_forward.cpu(), commit_logprob.cpu(),
                      row_fwd.tolist(), row_len.tolist(), seeds, tokens, finished, block, stats["forwards"],
                      time.perf_counter() - t_start, stats["model_s"], stats["remasked"], self_correct,
                      states, None if behaviour_logprob is None else behaviour_logprob.cpu())


PREFILL_FORWARD_TOKENS = 64  # a forward's fixed cost, in tokens of compute (CPU, the tiny model): what a
# group must save


def prefill_groups(lengths: list[int], block: int) -> list[slice]:
    """Split rows sorted by prompt length into contiguous groups, each prefilled by its own forward
    (its rows padded to its own longest prompt): the split with the fewest tokens computed, counting
    PREFILL_FORWARD_TOKENS per forward (dynamic programming over the sorted lengths)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: the cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last group is rows [i, j), padded to lengths[j - 1]
            cost = best[i] + (j - i) * (lengths[j - 1] + block) + PREFILL_FORWARD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(slice(cut[j], j))
        j = cut[j]
    return groups[::-1]


class _RowDecoder:
    """Per-row decoding with the exact KV cache (block_causal and causal models, no self-correction).

    Each row advances through its own blocks: a row that has committed its block moves on (the
    finished block enters its cache in the forward of its next block's first step) while others still
    work on theirs; a row that is done leaves the batch, and a waiting prompt takes its place (at most
    `slots` rows decode at once). Every forward, every active row steps, so nobody rides along. Row i
    sees exactly what it would see decoded alone: its own prompt, its own finished blocks, its own
    block (other rows' slots are masked), and it draws from its own generator: the same tokens as the
    lock-step loop, as decoding it alone (tested).

    The query of one forward is [pending | block] per row, left-padded: `pending` is what joins the
    row's cache (its prompt when it enters, its just-finished block, or, causal, its last token); the
    block (block_causal only) is the row's current block, whose logits the step reads.
    """

    def __init__(self, model, prompts, special, cfg, generators, block, steps_per_block, gen_len, slots,
                 canvas_state):
        self.special, self.cfg, self.generators = special, cfg, generators
        self.block, self.steps_per_block, self.gen_len = block, steps_per_block, gen_len
        self.causal = model.config.attention == "causal"
        # the call's tensors over all rows (canvas, commit_forward, ...), written in place
        self.s = canvas_state
        device = self.s["canvas"].device
        self.prompt, self.prompt_valid = left_pad(prompts, special.pad, device)
        self.prompt_pos, self.prompt_blocks, self.gen_pos, _ = layout(self.prompt_valid, gen_len, block)
        self.lengths = self.prompt_valid.sum(1)
        n = len(prompts)
        self.cur = torch.zeros(n, dtype=torch.long, device=device)  # each row's block (causal: next position)
        # steps done in its current block
        self.step_in_block = torch.zeros(n, dtype=torch.long, device=device)
        # -1: prompt; >= 0: that block; -2: none
        self.pending = torch.full((n,), -1, dtype=torch.long, device=device)
        self.waiting = list(range(n))
        self.active = torch.zeros(0, dtype=torch.long, device=device)  # rows in the batch, in cache order
        self.slots = slots or n
        self.cache = model.allocate_cache(self.prompt.shape[1] + gen_len + 2 * block)
        c = model.config
        self.cache.reserve(min(n, self.slots), self.cache.capacity, c.num_hidden_layers,
                           c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                           next(model.parameters()).dtype, device)
        self.cache.lengths = torch.zeros(min(n, self.slots), dtype=torch.long, device=device)

    def admit(self) -> None:
        """Waiting prompts join the batch while it has free slots."""
        free = self.slots - len(self.active)
        if free <= 0 or not self.waiting:
            return
        join, self.waiting = self.waiting[:free], self.waiting[free:]
        # by prompt length: the prefill groups are slices the cache has a row per slot at first
        join = sorted(join, key=lambda i: int(self.lengths[i]))
        if (missing := len(self.active) + len(join) - len(self.cache.lengths)) > 0:
            self.cache.add_rows(missing)
        self.active = torch.cat([self.active,
                                 torch.tensor(join, dtype=torch.long, device=self.active.device)])

    def query(self, rows: torch.Tensor):
        """[pending | block] ids, validity, positions and block ids [A, W] for these rows, the pending
        width, and how many of each row's tokens join its cache ([A])."""
        block, dev = self.block, rows.device
        pend = self.pending[rows]
        is_prompt, is_block = pend == -1, pend >= 0
        width = 0
        if bool(is_prompt.any()):
            width = int(self.lengths[rows][is_prompt].max())
        if bool(is_block.any()):
            width = max(width, block)
        a = len(rows)
        ids = torch.full((a, width), self.special.pad, dtype=torch.long, device=dev)
        valid = torch.zeros((a, width), dtype=torch.bool, device=dev)
        pos = torch.zeros((a, width), dtype=torch.long, device=dev)
        blk = torch.zeros((a, width), dtype=torch.long, device=dev)
        if width and bool(is_prompt.any()):
            p_width = min(width, self.prompt.shape[1])
            src = rows[is_prompt]
            for t, s in ((ids, self.prompt), (valid, self.prompt_valid), (pos, self.prompt_pos),
                         (blk, self.prompt_blocks)):
                t[is_prompt, width - p_width :] = s[src, -p_width:] if p_width else s[src, :0]
        if bool(is_block.any()):
            src, b = rows[is_block], pend[is_block]
            cols = b[:, None] * block + torch.arange(block, device=dev)
            ids[is_block, width - block :] = self.s["canvas"][src].gather(1, cols)
            valid[is_block, width - block :] = True
            pos[is_block, width - block :] = self.gen_pos[src].gather(1, cols)
            blk[is_block, width - block :] = b[:, None]
        kept = torch.where(pend == -2, 0, width)
        if not self.causal:  # the row's current block, whose logits this step reads
            cols = self.cur[rows][:, None] * block + torch.arange(block, device=dev)
            ids = torch.cat([ids, self.s["canvas"][rows].gather(1, cols)], 1)
            valid = torch.cat([valid, torch.ones((a, block), dtype=torch.bool, device=dev)], 1)
            pos = torch.cat([pos, self.gen_pos[rows].gather(1, cols)], 1)
            blk = torch.cat([blk, self.cur[rows][:, None].expand(-1, block)], 1)
        return ids, valid, pos, blk, width, kept

    def leave(self, done_active: torch.Tensor) -> None:
        """Rows that are done leave the batch (and its cache; the rows' order in it may change); waiting
        prompts join."""
        if bool(done_active.any()):
            self.active = self.active[self.cache.drop_rows(done_active)]
            self.admit()

    def run(self, forward, states: list | None) -> None:
        """Decode every row to its end (EOS block, or the canvas's end). The first forward of the batch
        (every prompt, and each row's first step) runs in groups of rows with prompts of similar length
        (`prefill_groups`): left padding to the longest prompt is compute for nothing."""
        self.admit()
        done = torch.zeros(len(self.active), dtype=torch.bool, device=self.active.device)
        for group in prefill_groups(self.lengths[self.active].tolist(), self.block):
            done[group] = self.step(forward, states, group)
        self.leave(done)
        while len(self.active):
            self.leave(self.step(forward, states, slice(None)))

    def step(self, forward, states: list | None, group: slice) -> torch.Tensor:
        """One forward and one step for the active rows in `group` (a slice of the batch: the cache's rows
        there); returns which of them are done."""
        s, cfg, block, special = self.s, self.cfg, self.block, self.special
        n_blocks, dev = self.gen_len // block, self.s["canvas"].device
        rows = self.active[group]
        whole = group == slice(None) or len(rows) == len(self.active)
        cache = self.cache if whole else self.cache.rows(group)
        s["row_len"][rows] = (self.cur[rows] + 1) * block
        ids, valid, pos, blk, width, kept = self.query(rows)
        stepping = torch.zeros(len(s["canvas"]), dtype=torch.bool, device=dev)
        stepping[rows] = True
        out = forward(stepping, input_ids=ids, attention_mask=valid, position_ids=pos, block_ids=blk,
                      # the head on the block
                      past_key_values=cache, use_cache=True, cache_len=kept,
                      logits_to_keep=1 if self.causal else block)
        if not whole:
            self.cache.merge_rows(group, cache)
        logits = out.logits
        cols = self.cur[rows][:, None] * block + torch.arange(block, device=dev)  # [A, block]
        current = s["canvas"][rows].gather(1, cols)
        if states is not None:
            full = torch.zeros((len(s["canvas"]), *logits.shape[1:]), dtype=torch.float)
            full[rows.cpu()] = logits.float().cpu()
            states.append((s["canvas"].clone().cpu(), stepping.cpu(), full))
        dist = proposal_logits(logits, special).log_softmax(-1)  # [A, block, V]
        gens = [self.generators[i] for i in rows.tolist()]
        everyone = torch.ones(len(rows), dtype=torch.bool, device=dev)
        token, conf, logp, b_logp = _propose(dist, cfg, gens, everyone)
        open_ = current == special.mask
        # a block's last possible step commits what is left (no draw)
        last = self.step_in_block[rows] == block - 1
        if cfg.commit_temperature is not None:
            chosen = _soft_commit_mask(dist.amax(-1).exp(), open_, cfg, gens, ~last)
        else:
            chosen = _commit_mask(conf, open_, (self.steps_per_block - self.step_in_block[rows]).clamp(min=1),
                                  cfg.threshold)
        chosen = torch.where(last[:, None], open_, chosen)
        at = (rows[:, None], cols)
        s["canvas"][at] = new = torch.where(chosen, token, current)
        s["commit_forward"][at] = torch.where(chosen, s["row_fwd"][rows][:, None], s["commit_forward"][at])
        s["commit_logprob"][at] = torch.where(chosen, logp, s["commit_logprob"][at])
        if s["behaviour_logprob"] is not None:
            s["behaviour_logprob"][at] = torch.where(chosen, b_logp, s["behaviour_logprob"][at])
        return self.finish_step(rows, ~(new == special.mask).any(1), n_blocks)

    def finish_step(self, rows: torch.Tensor, block_done: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """After a step: rows whose block is complete move to their next block (it joins their cache with
        the next forward) or, at EOS or the canvas's end, are done (returned: they leave)."""
        s, block = self.s, self.block
        cur = self.cur[rows]
        done = block_done & (cur == n_blocks - 1)
        if self.cfg.stop_at_eos:
            decoded = torch.arange(self.gen_len, device=rows.device)[None] < ((cur + 1) * block)[:, None]
            done |= block_done & ((s["canvas"][rows] == self.special.eos) & decoded).any(1)
        moving = block_done & ~done
        self.pending[rows] = torch.where(moving, cur, -2)
        self.cur[rows] = cur + moving.long()
        self.step_in_block[rows] = torch.where(moving, 0, self.step_in_block[rows] + 1)
        s["done"][rows] |= done
        return done


def replay_states(row: TrajectoryRow, mask_id: int) -> list[torch.Tensor]:
    """The canvas [G] before each of the row's steps, rebuilt from its record alone (pure).

    A step is one of the row's forwards that committed tokens; before it, every position committed by
    an earlier forward shows its token and every other position is MASK (blocks not yet started
    included). Needs an exactly replayable row (no self-correction)."""
    row.check_replayable()
    committed = row.commit_forward > 0
    steps = row.commit_forward[committed].unique().tolist()  # sorted
    return [torch.where(committed & (row.commit_forward < f), row.canvas,
                        torch.full_like(row.canvas, mask_id)) for f in steps]
