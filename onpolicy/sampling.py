"""THE sampler: block-wise parallel denoising with an exact KV cache (PAPER.md section 5).

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

Prompts of different lengths share a batch by left padding; positions skip the padding, so a
sequence decodes the same alone or in a batch. Other stages consume the returned `Trajectory`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from onpolicy.tokenizer import SpecialTokens


@dataclass
class SamplerConfig:
    """How to decode. Defaults: one token per step, greedy, cached."""

    max_new_tokens: int = 128  # canvas length after the prompt
    block_size: int | None = None  # None: the model's block size (block_causal), whole canvas (bidirectional)
    steps_per_block: int | None = None  # fixed steps per block; None = block_size (one token per step)
    threshold: float | None = None  # commit every masked position with confidence >= threshold (>= 1 per step)
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # sample among the k most likely tokens (temperature > 0)
    top_p: float | None = None  # nucleus sampling (temperature > 0)
    remask_threshold: float | None = None  # self-correction: re-open a committed token of the current
    #                                        block when its probability falls below this and the model prefers another
    max_steps_per_block: int | None = None  # step budget per block with self-correction (default 2 x block)
    use_cache: bool = True  # exact KV cache of finished blocks (block_causal and causal models)
    stop_at_eos: bool = True  # stop a sequence after the block in which it commits EOS


@dataclass
class Trajectory:
    """What one `generate` call did, per prompt; stages 3 and 4 consume it."""

    tokens: list[list[int]]  # generated ids per prompt, cut before the first EOS
    commit_step: list[list[int]]  # per generated token: the forward pass (1-based) that last committed it
    finished: list[bool]  # True if the sequence emitted EOS
    forwards: int  # model forward passes for the whole batch (cache writes included)
    seconds: float = 0.0  # wall-clock time of the whole call
    model_seconds: float = 0.0  # of which inside model forwards (the rest is sampler overhead)
    remasked: int = 0  # tokens re-opened by self-correction
    states: list[torch.Tensor] = field(default_factory=list)  # [B, G] canvas after each step, if recorded

    @property
    def tokens_per_forward(self) -> float:
        return sum(len(t) for t in self.tokens) / max(1, self.forwards * len(self.tokens))

    @property
    def overhead_fraction(self) -> float:
        return 1.0 - self.model_seconds / self.seconds if self.seconds > 0 else 0.0


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, device=device)
            valid[i, width - len(p) :] = True
    return ids, valid


def _propose(logits: torch.Tensor, special: SpecialTokens, cfg: SamplerConfig, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate token, its confidence, and the model's distribution: [B, L, V] -> [B, L], [B, L], [B, L, V].

    Confidence is the model's own probability of the candidate (temperature 1, unfiltered), so the
    commit order does not depend on how the candidate was drawn.
    """
    logits = logits.float()
    logits[..., special.mask] = -float("inf")  # never propose the noise token or padding
    logits[..., special.pad] = -float("inf")
    probs = logits.softmax(-1)
    if cfg.temperature <= 0:
        conf, token = probs.max(-1)
        return token, conf, probs
    scaled = logits / cfg.temperature
    if cfg.top_k is not None:
        kth = scaled.topk(min(cfg.top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, -float("inf"))
    if cfg.top_p is not None:
        sorted_logits, order = scaled.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    draw = scaled.softmax(-1)
    token = torch.multinomial(draw.flatten(0, 1).cpu(), 1, generator=generator).view(draw.shape[:2]).to(logits.device)
    return token, probs.gather(-1, token[..., None])[..., 0], probs


def _commit_mask(conf: torch.Tensor, open_: torch.Tensor, n_steps_left: int, threshold: float | None) -> torch.Tensor:
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


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    special: SpecialTokens,
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    record_states: bool = False,
) -> Trajectory:
    """Decode a batch of prompts (token id lists) with the model's own attention mode."""
    t_start = time.perf_counter()
    mode = model.config.attention
    device = next(model.parameters()).device
    if mode == "causal":
        block = 1
    elif cfg.block_size is not None:
        block = cfg.block_size
    else:
        block = model.config.block_size if mode == "block_causal" else cfg.max_new_tokens
    steps_per_block = cfg.steps_per_block or block
    self_correct = cfg.remask_threshold is not None and mode != "causal"
    max_steps = (cfg.max_steps_per_block or 2 * block) if self_correct else block
    if block < 1 or steps_per_block < 1 or max_steps < 1:
        raise ValueError("block_size, steps_per_block and max_steps_per_block must be >= 1")
    n_blocks = -(-cfg.max_new_tokens // block)
    gen_len = n_blocks * block

    prompt, prompt_valid = _left_pad(prompts, special.pad, device)  # [B, P]
    batch, p_len = prompt.shape
    prompt_pos = (prompt_valid.long().cumsum(1) - 1).clamp(min=0)  # [B, P]
    lengths = prompt_valid.sum(1)  # [B]
    # Generated blocks are numbered 0, 1, ... from the end of each prompt; the prompt's own tokens
    # fall in blocks < 0 (floor division), so every sequence's first block starts right after it.
    prompt_blocks = torch.div(prompt_pos - lengths[:, None], block, rounding_mode="floor")
    gen_pos = lengths[:, None] + torch.arange(gen_len, device=device)  # [B, G]
    gen_blocks = torch.arange(gen_len, device=device).div(block, rounding_mode="floor").expand(batch, -1)

    canvas = torch.full((batch, gen_len), special.mask, dtype=torch.long, device=device)  # [B, G]
    commit_step = torch.zeros((batch, gen_len), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stats = {"forwards": 0, "model_s": 0.0, "remasked": 0}
    states = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(**kw):
        sync()
        tic = time.perf_counter()
        out = model(**kw)
        sync()
        stats["model_s"] += time.perf_counter() - tic
        stats["forwards"] += 1
        return out

    cached = cfg.use_cache and mode in ("block_causal", "causal")
    keep = {"logits_to_keep": 1} if mode == "causal" else {}  # a causal decoder reads only the last logits
    cache, next_logits = None, None
    if cached:  # the prompt goes into the cache once
        out = forward(input_ids=prompt, attention_mask=prompt_valid, position_ids=prompt_pos, block_ids=prompt_blocks, use_cache=True,
                      **keep)
        cache, next_logits = out.past_key_values, out.logits[:, -1:]

    full_valid = torch.cat([prompt_valid, torch.ones_like(canvas, dtype=torch.bool)], 1)
    full_pos, full_blocks = torch.cat([prompt_pos, gen_pos], 1), torch.cat([prompt_blocks, gen_blocks], 1)

    for b in range(n_blocks):
        sl = slice(b * block, (b + 1) * block)
        canvas[done, sl] = special.eos  # finished sequences only pad out the batch
        for step in range(max_steps):  # every step commits >= 1 token per open sequence
            open_ = canvas[:, sl] == special.mask  # [B, block]
            if not open_.any() and not self_correct:
                break
            if mode == "causal":
                if cached:
                    logits = next_logits
                else:
                    end = p_len + sl.start
                    logits = forward(input_ids=torch.cat([prompt, canvas], 1)[:, :end], attention_mask=full_valid[:, :end],
                                     position_ids=full_pos[:, :end], **keep).logits[:, -1:]
            elif cached:
                logits = forward(input_ids=canvas[:, sl], position_ids=gen_pos[:, sl], block_ids=gen_blocks[:, sl],
                                 past_key_values=cache).logits
            else:
                logits = forward(input_ids=torch.cat([prompt, canvas], 1), attention_mask=full_valid, position_ids=full_pos,
                                 block_ids=full_blocks).logits[:, p_len + sl.start : p_len + sl.stop]
            token, conf, probs = _propose(logits, special, cfg, generator)  # [B, block]
            last_step = step == max_steps - 1
            if self_correct and not last_step:
                current = canvas[:, sl]
                p_current = probs.gather(-1, current[..., None])[..., 0]
                reopen = ~open_ & ~done[:, None] & (p_current < cfg.remask_threshold) & (token != current)
                if reopen.any():
                    stats["remasked"] += int(reopen.sum())
                    open_ = open_ | reopen
                if not open_.any():
                    break
            chosen = open_ if last_step else _commit_mask(conf, open_, max(1, steps_per_block - step), cfg.threshold)
            canvas[:, sl] = torch.where(chosen, token, canvas[:, sl])
            commit_step[:, sl] = torch.where(chosen, stats["forwards"], commit_step[:, sl])
            if record_states:
                states.append(canvas.clone().cpu())
        if cfg.stop_at_eos:
            done |= (canvas[:, : sl.stop] == special.eos).any(1)
        if bool(done.all()) or b == n_blocks - 1:
            break
        if cached:  # the finished block joins the cache; for AR this forward also predicts the next token
            out = forward(input_ids=canvas[:, sl], position_ids=gen_pos[:, sl], block_ids=gen_blocks[:, sl],
                          past_key_values=cache, use_cache=True, **keep)
            cache, next_logits = out.past_key_values, out.logits[:, -1:]

    tokens, steps, finished = [], [], []
    for i in range(batch):
        row = canvas[i].tolist()
        end = row.index(special.eos) if special.eos in row else len(row)
        end = min(end, cfg.max_new_tokens)
        tokens.append(row[:end])
        steps.append(commit_step[i, :end].tolist())
        finished.append(special.eos in row[: cfg.max_new_tokens])
    return Trajectory(tokens, steps, finished, stats["forwards"], time.perf_counter() - t_start, stats["model_s"],
                      stats["remasked"], states)
