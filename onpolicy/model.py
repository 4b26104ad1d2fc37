"""DiffusionTransformer: a small Llama-style transformer (RoPE, RMSNorm, SwiGLU, SDPA) whose
attention pattern comes from its config:

- ``bidirectional``: every token sees every token (plain masked diffusion, LLaDA/MDLM).
- ``block_causal``: tokens see their own block and all earlier blocks (BD3-LM / SDAR). Trained with
  the clean sequence appended (`clean_input_ids`), so a noisy block learns to read *clean* earlier
  blocks: exactly what the sampler's KV cache holds at inference, so the cache is exact.
- ``causal``: the same-size autoregressive baseline.

It is a transformers `PreTrainedModel` registered with the Auto classes, so checkpoints are plain
HF folders (safetensors) that load with `AutoModel.from_pretrained` after `import onpolicy`, and the
model works with PEFT and DeepSpeed like any HF model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

ATTENTION_MODES = ("bidirectional", "block_causal", "causal")
# sdpa: a boolean mask [B, 1, Lq, Lk] (the CPU path, and every forward with a KV cache); flex:
# flex_attention with a BlockMask built from the block rule, never a dense mask (compiled on GPU);
# auto: flex on CUDA for cache-free block_causal forwards (training), sdpa otherwise.
ATTENTION_KERNELS = ("auto", "sdpa", "flex")


class DiffusionTransformerConfig(PretrainedConfig):
    model_type = "onpolicy_diffusion"

    def __init__(
        self,
        vocab_size: int = 2048,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        attention: str = "block_causal",
        block_size: int = 32,
        initializer_range: float = 0.02,
        mask_token_id: int | None = None,
        shift_logits: bool = False,
        attention_kernel: str = "auto",
        num_key_value_heads: int | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        **kwargs,
    ):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention='{attention}' is not one of {ATTENTION_MODES}")
        if attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel='{attention_kernel}' is not one of {ATTENTION_KERNELS}")
        if shift_logits and attention == "causal":
            raise ValueError("shift_logits is for diffusion models (a causal model's loss shifts already)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 64 * -(-(8 * hidden_size // 3) // 64)
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention = attention
        self.block_size = block_size
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        # Dream-style AR-to-diffusion adaptation: the prediction for position i is read from the hidden
        # state at i - 1, as in the AR model the weights came from (see `shift_to_previous`).
        self.shift_logits = shift_logits
        self.attention_kernel = attention_kernel
        # Grouped-query attention and projection biases: what Llama / Qwen2 checkpoints bring
        # (onpolicy.convert); our own models use neither.
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        if num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        self.attention_bias = attention_bias  # biases on q, k, v (Qwen2)
        self.attention_out_bias = attention_out_bias  # bias on o (Llama's attention_bias sets both)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


@dataclass
class KVCache:
    """Keys and values of finished (clean) tokens, per layer, plus what masking needs about them.

    Preallocated and written in place (no copy of the past per forward). Each row holds its own
    number of cached slots (`lengths`): rows of one batch may be at different blocks (the sampler
    decodes each row at its own pace). A forward writes row i's new tokens into the slots after its
    own `lengths[i]` and attends to everything up to them; slots past a row's own end are masked.
    With `use_cache` the first `cache_len` new tokens (default all; an int or one count per row) then
    join the row's cache; the others were scratch and are overwritten by the next forward. That is
    what lets the sampler write a finished block into the cache in the same forward as the next
    block's first step. Buffers are [batch, heads, capacity, head_dim]; they grow (a copy) only when a
    write would not fit. `drop_rows` and `add_rows` let rows leave and join a batch between forwards.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    positions: torch.Tensor | None = None  # [B, capacity] RoPE position of each slot
    block_ids: torch.Tensor | None = None  # [B, capacity] block index of each slot
    valid: torch.Tensor | None = None  # [B, capacity] False for padding
    lengths: torch.Tensor | None = None  # [B] long: slots that hold each row's cached tokens (None: all 0)
    capacity: int = 0  # slots to allocate at the first write (grown as needed)
    last_logits: torch.Tensor | None = None  # [B, 1, V] raw logits of each row's last cached token
    # (shift_logits)
    mask_memo: tuple | None = None  # (lengths, q_pos, q_block, q_valid, mask): the same query at the same
    # lengths reuses its mask
    window: tuple | None = None  # (start, end, slots) of the forward in flight: see `open_window`

    @property
    def length(self) -> int:
        """The longest row's cached slots (every row's, when the batch moves in lock-step)."""
        return 0 if self.lengths is None or not len(self.lengths) else int(self.lengths.max())

    def open_window(self, batch: int, n: int, device) -> tuple[int, int, torch.Tensor | None]:
        """Where this forward's `n` new tokens go: each row's slots after its own length. Sets and returns
        the window the attention layers read, (start, end, slots): start the longest row's length, end
        start + n, slots None when every row starts there (a plain slice), else [B, n] per-row slots."""
        if self.lengths is None:
            self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        start = self.length
        uniform = bool((self.lengths == start).all())
        slots = None if uniform else self.lengths[:, None] + torch.arange(n, device=device)
        self.window = (start, start + n, slots)
        return self.window

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values [B, H, n, D] in the window; return the keys and values
        to attend to ([B, H, end, D])."""
        start, end, slots = self.window
        keys, values = self.keys[layer], self.values[layer]
        if slots is None:
            keys[:, :, start : start + k.shape[2]] = k.detach()
            values[:, :, start : start + k.shape[2]] = v.detach()
        else:
            index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            keys.scatter_(2, index, k.detach())
            values.scatter_(2, index, v.detach())
        return keys[:, :, :end], values[:, :, :end]

    def write_meta(self, position_ids, block_ids, valid) -> torch.Tensor:
        """Store the new tokens' positions, blocks and padding flags; return which of the first `end`
        slots each row may attend to ([B, end] bool: valid, and not past the row's own end)."""
        start, end, slots = self.window
        n = position_ids.shape[1]
        for buffer, new in ((self.positions, position_ids), (self.block_ids, block_ids), (self.valid, valid)):
            if slots is None:
                buffer[:, start : start + n] = new
            else:
                buffer.scatter_(1, slots, new)
        if slots is None:
            return self.valid[:, :end]
        own_end = self.lengths + n
        return self.valid[:, :end] & (torch.arange(end, device=valid.device)[None] < own_end[:, None])

    def advance(self, kept: int | torch.Tensor | None, n: int, raw: torch.Tensor, offset: int = 0,
                shift: bool = True) -> None:
        """After a forward with `use_cache`: the first `kept` new tokens (per row, or all `n`) join each
        row's cache, and a row that kept any remembers the raw logits of its last kept token (raw: the
        head's output from the forward's token `offset` on: logits_to_keep ran it on the last ones only;
        only a `shift`ed model reads them)."""
        if torch.is_tensor(kept):
            kept = kept.to(self.lengths)
        else:
            kept = torch.full_like(self.lengths, n if kept is None else kept)
        joined = kept > 0
        if shift and bool((joined & (kept - 1 < offset)).any()):
            raise ValueError("logits_to_keep cut off the head's output of a token that joins the cache")
        new = raw[torch.arange(raw.shape[0], device=raw.device), (kept - 1 - offset).clamp(min=0)][:, None]
        if self.last_logits is None or self.last_logits.shape != new.shape:
            self.last_logits = new.detach().clone()
        else:
            self.last_logits = torch.where(joined[:, None, None], new.detach(), self.last_logits)
        self.lengths = self.lengths + kept

    def reserve(self, batch: int, needed: int, layers: int, heads: int, head_dim: int, dtype, device) -> None:
        """Make room for `needed` slots (allocating at first use, copying only to grow)."""
        have = self.keys[0].shape[2] if self.keys else 0
        if needed <= have:
            return
        size = max(needed, self.capacity, 2 * have)
        kv = lambda: torch.zeros(batch, heads, size, head_dim, dtype=dtype, device=device)  # noqa: E731
        meta = lambda d: torch.zeros(batch, size, dtype=d, device=device)  # noqa: E731
        old = (self.keys, self.values, self.positions, self.block_ids, self.valid)
        self.keys, self.values = [kv() for _ in range(layers)], [kv() for _ in range(layers)]
        self.positions, self.block_ids, self.valid = meta(torch.long), meta(torch.long), meta(torch.bool)
        if have:
            for new, prev in zip(self.keys + self.values, old[0] + old[1]):
                new[:, :, :have] = prev
            for new, prev in zip((self.positions, self.block_ids, self.valid), old[2:]):
                new[:, :have] = prev

    def drop_rows(self, gone: torch.Tensor) -> torch.Tensor:
        """Rows leave the batch (bool [B], True = leaves). Each leaving row among the first kept-count slots
        takes a staying row from the end (one row's copy), then every buffer is cut to the kept count (a
        view): no copy of the whole cache. Returns the new row order (old row indices, [kept])."""
        b = len(gone)
        kept = b - int(gone.sum())
        order = torch.arange(b, device=gone.device)
        holes = gone[:kept].nonzero().flatten()  # leaving rows inside the kept range ...
        movers = (~gone[kept:]).nonzero().flatten() + kept  # ... filled by staying rows past it
        order[holes] = movers
        order = order[:kept]
        for buffers in (self.keys, self.values):
            for i, t in enumerate(buffers):
                t[holes] = t[movers]
                buffers[i] = t[:kept]
        for name in ("positions", "block_ids", "valid", "lengths", "last_logits"):
            t = getattr(self, name)
            if t is not None:
                t[holes] = t[movers]
                setattr(self, name, t[:kept])
        self.mask_memo = None
        return order

    def rows(self, group: slice) -> KVCache:
        """The rows in `group` as a cache of their own that writes into this one's buffers (views): a
        forward on some rows of a batch. `merge_rows` takes back their lengths and last logits."""
        view = lambda t: None if t is None else t[group]  # noqa: E731
        return KVCache([k[group] for k in self.keys], [v[group] for v in self.values], view(self.positions),
                       view(self.block_ids), view(self.valid), view(self.lengths).clone(), self.capacity,
                       view(self.last_logits))

    def merge_rows(self, group: slice, part: KVCache) -> None:
        self.lengths[group] = part.lengths
        if part.last_logits is not None:
            if self.last_logits is None:
                self.last_logits = part.last_logits.new_zeros((len(self.lengths),
                                                               *part.last_logits.shape[1:]))
            self.last_logits[group] = part.last_logits
        self.mask_memo = None

    def add_rows(self, n: int) -> None:
        """Append `n` empty rows (length 0) after the others: rows join the batch."""
        if self.lengths is None or not self.keys:
            raise ValueError("add_rows needs a cache that has been written once")
        grow = lambda t: torch.cat([t, t.new_zeros((n, *t.shape[1:]))]) if t is not None else None  # noqa: E731
        self.keys, self.values = [grow(k) for k in self.keys], [grow(v) for v in self.values]
        self.positions, self.block_ids = grow(self.positions), grow(self.block_ids)
        self.valid = grow(self.valid)
        self.lengths, self.last_logits, self.mask_memo = grow(self.lengths), grow(self.last_logits), None


@dataclass
class DiffusionOutput(ModelOutput):
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None


def attention_allowed(
    mode: str,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_block: torch.Tensor,
    k_block: torch.Tensor,
    k_valid: torch.Tensor,
    q_noisy: torch.Tensor | None = None,
    k_noisy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which key each query may attend to: bool [B, 1, Lq, Lk] (True = attend).

    q_pos/q_block/q_noisy: [B, Lq]; k_pos/k_block/k_valid/k_noisy: [B, Lk].
    block_causal (BD3-LM, arXiv 2503.09573, eq. for M_full):
      clean query -> clean keys of its own and earlier blocks;
      noisy query -> clean keys of earlier blocks, and noisy keys of its own block.
    Without noisy flags every token counts as clean, which is also the rule for a noisy block
    appended after a clean prefix (its own block, plus all earlier blocks).
    """
    qb, kb = q_block[:, :, None], k_block[:, None, :]  # [B, Lq, 1], [B, 1, Lk]
    if mode == "causal":
        allowed = k_pos[:, None, :] <= q_pos[:, :, None]
    elif mode == "bidirectional":
        allowed = torch.ones(qb.shape[0], qb.shape[1], kb.shape[2], dtype=torch.bool, device=q_pos.device)
    elif q_noisy is None:
        allowed = kb <= qb
    else:
        qn, kn = q_noisy[:, :, None], k_noisy[:, None, :]
        allowed = torch.where(qn, (~kn & (kb < qb)) | (kn & (kb == qb)), ~kn & (kb <= qb))
    return (allowed & k_valid[:, None, :])[:, None]


def flex_block_mask(mode: str, pos: torch.Tensor, block: torch.Tensor, valid: torch.Tensor,
                    noisy: torch.Tensor | None):
    """The same rule as `attention_allowed` (queries = keys, no cache) as a flex_attention BlockMask:
    evaluated per tile, so no dense [B, 1, L, L] mask exists on GPU (where mask building is compiled).
    A padding query sees itself, as in the dense path, so no row is empty."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        if mode == "causal":
            rule = pos[b, k] <= pos[b, q]
        elif mode == "bidirectional":
            rule = valid[b, k]
        elif noisy is None:
            rule = block[b, k] <= block[b, q]
        else:
            qn, kn, qb, kb = noisy[b, q], noisy[b, k], block[b, q], block[b, k]
            rule = torch.where(qn, (~kn & (kb < qb)) | (kn & (kb == qb)), ~kn & (kb <= qb))
        return (rule & valid[b, k]) | (q == k)

    n = pos.shape[1]
    return create_block_mask(mask_mod, pos.shape[0], None, n, n, device=pos.device, _compile=pos.is_cuda)


_compiled_flex = None


def flex_attention(q, k, v, block_mask, gqa: bool = False):
    """torch's flex_attention: compiled once on GPU (its fast path), eager on CPU (tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if not q.is_cuda:
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex)  # shapes that vary (replays) become dynamic after one recompile
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


class Linear(nn.Linear):
    """nn.Linear with a faster path for one-token CPU decoding (what an AR step or a batch-1 cached
    forward of one token runs). With a single input row, a wide weight (out > in) is multiplied in
    its transposed layout, which single-threaded CPU BLAS streams 1.3-2x faster than the row-major
    weight (`benchmarks/sampler_overhead.py`). Only without gradient, on CPU; the transposed copy is
    cached and follows the weight (its version counter and storage), so an optimizer step or a load
    refreshes it. Same parameters and state dict as nn.Linear (PEFT, DeepSpeed and checkpoints see
    an nn.Linear)."""

    _decode_weight: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and x.numel() == self.in_features and self.out_features > self.in_features
                and not torch.is_grad_enabled() and w.numel() == self.in_features * self.out_features):
            key = (w._version, w.data_ptr(), x.dtype)
            if self._decode_weight is None or self._decode_weight[0] != key:
                self._decode_weight = (key, w.detach().t().to(x.dtype).contiguous())
            out = x @ self._decode_weight[1]
            return out if self.bias is None else out + self.bias
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 whatever the autocast dtype; F.rms_norm is one kernel instead of six
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and signed sin of shape [B, 1, L, head_dim] for integer positions [B, L]: RoPE with
    rotate-half pairs (i, i + head_dim/2), as Llama. The sin's first half carries the minus sign of
    rotate_half, so `apply_rope` needs one roll instead of two slices, a negation and a cat."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, L, head_dim/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1)[:, None].to(dtype), torch.cat([-sin, sin], dim=-1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, half) * signed_sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: DiffusionTransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv_dim = self.n_kv * self.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_out_bias)

    def forward(self, x, cos, sin, allowed, cache: KVCache | None = None, layer: int = 0, is_causal=False,
                only=None):
        """`only` ([B, K] long, no cache, a dense mask): queries at those tokens alone (keys and values
        from all); the output is theirs, [B, K, hidden]."""
        b, n, _ = x.shape
        k, v = (p(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        k = apply_rope(k, cos, sin)  # [B, H, L, D]
        if only is not None:
            x, (q_cos, q_sin) = pick_tokens(x, only), (pick_tokens(t.expand(b, -1, -1, -1), only, dim=2)
                                                       for t in (cos, sin))
            allowed = None if allowed is None else pick_tokens(allowed.expand(b, -1, -1, -1), only, dim=2)
            cos, sin, n = q_cos, q_sin, only.shape[1]
        q = apply_rope(self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        if cache is not None:  # write the new keys after each row's cached ones, attend to both (no copy)
            k, v = (t.to(q.dtype) for t in cache.write(layer, k, v))
        gqa = self.n_kv != self.n_heads  # each key/value head serves n_heads / n_kv query heads
        if allowed is not None and not isinstance(allowed, torch.Tensor):  # a flex BlockMask
            out = flex_attention(q, k, v, allowed, gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal,
                                                 enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: DiffusionTransformerConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: DiffusionTransformerConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, allowed, cache=None, layer=0, is_causal=False, only=None):
        """`only` ([B, K] long): the layer's output at those tokens alone (see Attention)."""
        h = self.self_attn(self.input_norm(x), cos, sin, allowed, cache, layer, is_causal, only)
        x = (x if only is None else pick_tokens(x, only)) + h
        return x + self.mlp(self.post_attention_norm(x))


def pick_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x's tokens at index [B, K] along `dim` (1 for [B, L, ...], 2 for [B, H, L, ...])."""
    shape = [*index.shape[:1], *([1] * (dim - 1)), index.shape[1], *([1] * (x.dim() - dim - 1))]
    idx = index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1 :])
    return x.gather(dim, idx)


class DiffusionTransformer(PreTrainedModel):
    config_class = DiffusionTransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Layer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}  # tied only when
    # config.tie_word_embeddings
    broadcast_mask = True  # rows with one layout share one [1, 1, L, L] mask (False: one per row;
    # benchmarks/train_layout.py)

    def __init__(self, config: DiffusionTransformerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # Recompute each layer's activations in the backward pass instead of keeping them (set by
        # `train.gradient_checkpointing`, or transformers' gradient_checkpointing_enable()).
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def allocate_cache(self, capacity: int) -> KVCache:
        """An empty KV cache for up to `capacity` tokens (allocated at its first write)."""
        return KVCache(capacity=capacity)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        block_ids: torch.Tensor | None = None,
        clean_input_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        cache_len: int | torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        **unused,
    ) -> DiffusionOutput:
        """Logits for `input_ids` [B, L].

        attention_mask: [B, L], 1 for real tokens, 0 for padding (padded keys are never attended).
        position_ids:   [B, L] RoPE positions; default continues the cache, skipping padding.
        block_ids:      [B, L] block index per token (block_causal); default position // block_size.
        clean_input_ids: block_causal training only (BD3-LM): the clean sequence x0 [B, L]. It is
                        appended after the noisy `input_ids` and logits are returned for the noisy
                        half only.
        past_key_values: a KVCache of clean prefix tokens (written in place, see KVCache); with
                        `use_cache` and no cache given, a new one is made. The cache is returned.
        use_cache:      the first `cache_len` input tokens (default: all) join the cache. Queries
                        follow the model's attention rule, so with block_causal a finished block
                        and the next (noisy) block can share one forward: the noisy block sees the
                        finished one, never the reverse.
        logits_to_keep: > 0 computes the head only for the last that many tokens (what a causal
                        decoder needs, or a block's step), as in transformers (with shift_logits, also on
                        the token before them); not with BD3 training. With a cache, each row's last
                        token that joins it must be among them or the one before (its logits are kept).
        logits_at:      [B, L] bool, without a cache: the head runs only where a loss reads it (e.g. the
                        masked positions) and logits come back packed, [M, V] in row-major order of the
                        True positions (the same values as the full logits there). The training path:
                        no [B, 2L, V] tensor is ever made.
        """
        cfg = self.config
        b, n = input_ids.shape
        device = input_ids.device
        valid = torch.ones(b, n, dtype=torch.bool,
                           device=device) if attention_mask is None else attention_mask.bool()
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(capacity=n)
        # continue each row's cached positions (the cache's padding slots hold position 0)
        if position_ids is None:
            start = 0
            if cache is not None and cache.length:
                seen = cache.positions[:, : cache.length] * cache.valid[:, : cache.length]
                start = seen.max(dim=1).values[:, None] + 1
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0) + start
        if block_ids is None:
            block_ids = position_ids // cfg.block_size
        noisy = None
        if clean_input_ids is not None:
            if cfg.attention != "block_causal" or cache is not None:
                raise ValueError("clean_input_ids is for block_causal training, without a cache")
            input_ids = torch.cat([input_ids, clean_input_ids], dim=1)
            position_ids, block_ids, valid = (torch.cat([t, t], dim=1)
                                              for t in (position_ids, block_ids, valid))
            noisy = torch.arange(2 * n, device=device)[None].expand(b, -1) < n
        if logits_to_keep and noisy is not None:
            raise ValueError("logits_to_keep is for plain forwards (not BD3 training)")
        if logits_at is not None and cache is not None:
            raise ValueError("logits_at is for forwards without a cache (training)")

        x = self.embed_tokens(input_ids)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        past_len = 0
        k_pos, k_block, k_valid, k_noisy = position_ids, block_ids, valid, noisy
        if cache is not None:
            past_len, end, _ = cache.open_window(b, n, device)
            cache.reserve(b, end, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, x.dtype, device)
            k_valid = cache.write_meta(position_ids, block_ids, valid)
            k_pos, k_block = cache.positions[:, :end], cache.block_ids[:, :end]
        kernel = cfg.attention_kernel
        if kernel == "auto":
            kernel = ("flex" if device.type == "cuda" and cfg.attention == "block_causal" and cache is None
                      else "sdpa")
        if kernel == "flex" and cache is None:
            allowed = flex_block_mask(cfg.attention, position_ids, block_ids, valid, noisy)
        else:
            allowed = self._attention_mask(position_ids, block_ids, noisy, valid, k_pos, k_block, k_valid,
                                           k_noisy, cache)
        # A pure causal pass with no padding and no cache takes SDPA's fused causal path.
        fast_causal = allowed is None and cfg.attention == "causal" and cache is None

        cos, sin = rope_cos_sin(position_ids, head_dim, cfg.rope_theta, x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        read = None  # with logits_at: the tokens the head reads, and the last layer computes only those
        if logits_at is not None:
            rows, cols = logits_at.nonzero(as_tuple=True)
            if cfg.shift_logits:
                cols = shift_sources(n, block_ids[:, :n], noisy is not None)[rows, cols]
            read = (rows, cols, wanted_tokens(rows, cols, b, x.shape[1])
                    if isinstance(allowed, torch.Tensor | None) else None)
        for i, layer in enumerate(self.layers):
            only = read[2] if read is not None and i == len(self.layers) - 1 else None
            if recompute:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint
                x = checkpoint(layer.__call__, x, cos, sin, allowed, cache, i, fast_causal, only)
            else:
                x = layer(x, cos, sin, allowed, cache, i, is_causal=fast_causal, only=only)
        if read is not None:  # the head on the tokens read, each logit from its source token (shift)
            rows, cols, only = read
            if only is not None:  # where each source token sits among the last layer's outputs
                slot = torch.zeros(b, noisy.shape[1] if noisy is not None else n, dtype=torch.long,
                                   device=device)
                slot.scatter_(1, only, torch.arange(only.shape[1], device=device)[None].expand(b, -1))
                cols = slot[rows, cols]
            return DiffusionOutput(logits=self.lm_head(self.norm(x[rows, cols])), past_key_values=None)
        # the head on the last `logits_to_keep` tokens (and, with shift_logits, the one before them), or all
        tail = min(n, logits_to_keep + cfg.shift_logits) if logits_to_keep else 0
        raw = self.lm_head(self.norm(x[:, -tail:] if tail else x))
        offset = n - tail if tail else 0  # the query index of raw's first token
        logits = raw[:, :n]
        if cfg.shift_logits:
            at = slice(offset, n)
            logits = shift_to_previous(raw, raw.shape[1] if tail else n, block_ids[:, at],
                                       cache if past_len else None, valid[:, at])
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        if cache is not None and use_cache:
            cache.advance(cache_len, n, raw, offset, cfg.shift_logits)
        return DiffusionOutput(logits=logits, past_key_values=cache)

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.Tensor | list[list[int]],
        attention_mask: torch.Tensor | None = None,
        seed: int = 0,
        return_trajectory: bool = False,
        **decoding,
    ):
        """Continue each prompt with the block sampler (the one in `sampling.py`, shipped beside this
        file in an exported folder). Decoding options are `SamplerConfig`'s fields (`max_new_tokens`,
        `block_size`, `steps_per_block`, `threshold`, `temperature`, ...); unset ones come from the
        config's `decoding` (the recommended decoding saved with the model), then SamplerConfig's defaults.

        input_ids: [B, P] (left or right padding marked by `attention_mask`) or a list of id lists.
        Returns [B, P + G] ids: each prompt, then its completion cut before EOS, padded with the pad
        id (the Trajectory as well with `return_trajectory=True`).
        """
        from dataclasses import fields as dataclass_fields

        from .sampling import SamplerConfig, generate
        from .special_tokens import SpecialTokens

        known = {f.name for f in dataclass_fields(SamplerConfig)}
        unknown = sorted(set(decoding) - known)
        if unknown:
            raise ValueError(f"diffusion_generate: unknown options {unknown}; valid: {sorted(known)}")
        saved = getattr(self.config, "decoding", None) or {}
        options = {k: v for k, v in saved.items() if k in known and v is not None}
        options.update({k: v for k, v in decoding.items() if v is not None})
        cfg = SamplerConfig(**options)
        if isinstance(input_ids, torch.Tensor):
            no_mask = attention_mask is None
            keep = torch.ones_like(input_ids, dtype=torch.bool) if no_mask else attention_mask.bool()
            prompts = [row[m].tolist() for row, m in zip(input_ids, keep)]
        else:
            prompts = [list(p) for p in input_ids]
        c = self.config
        ids = {k: getattr(c, f"{k}_token_id", None) for k in ("pad", "bos", "eos", "mask")}
        if None in (ids["pad"], ids["eos"], ids["mask"]):
            raise ValueError("diffusion_generate needs pad, eos and mask token ids in the config; it has "
                             f"{ids}")
        special = SpecialTokens(**ids, sep=-1, vocab_size=c.vocab_size)
        traj = generate(self, prompts, special, cfg, seeds=[seed + i for i in range(len(prompts))])
        rows = [p + t for p, t in zip(prompts, traj.tokens)]
        width = max(map(len, rows))
        out = torch.full((len(rows), width), ids["pad"], dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return (out, traj) if return_trajectory else out

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **decoding):
        """`model.generate(ids, max_new_tokens=...)` as users of transformers write it: the block-diffusion
        sampler (`diffusion_generate`); transformers' own generation loop cannot decode a diffusion model.
        Options other than the sampler's (`do_sample`, `num_beams`, ...) are refused by name."""
        if decoding.pop("do_sample", False) and "temperature" not in decoding:
            decoding["temperature"] = 1.0
        return self.diffusion_generate(input_ids, attention_mask=attention_mask, **decoding)

    def _attention_mask(self, q_pos, q_block, q_noisy, q_valid, k_pos, k_block, k_valid, k_noisy,
                        cache) -> torch.Tensor | None:
        """The boolean attention mask [B, 1, Lq, Lk], or None when SDPA needs none (no padding, no
        cache: full attention, or its own fused causal path). A query repeated at the same cache length
        (every step inside a block) reuses the mask built at its first step."""
        mode = self.config.attention
        if bool(k_valid.all()):  # no padding: the common unbatched cases need no mask at all
            if cache is None and mode in ("causal", "bidirectional"):
                return None
            # one new token sees everything
            if cache is not None and q_pos.shape[1] == 1 and mode == "causal":
                return None
            if cache is not None and mode == "block_causal" and bool((q_block == k_block[:, -1:]).all()):
                return None  # one block after its prefix sees everything (a step inside a block)
        same = lambda t: t is None or bool((t == t[:1]).all())  # noqa: E731
        if (self.broadcast_mask and cache is None and q_pos.shape[0] > 1 and bool(k_valid.all())
                and same(q_pos) and same(q_block) and same(q_noisy)):
            # every row has the same layout (packed training rows, no padding): one mask [1, 1,
            # L, L], broadcast over the batch, instead of B copies (measured: a fifth less
            # attention time in BD3 training)
            first = lambda t: None if t is None else t[:1]  # noqa: E731
            return self._attention_mask(first(q_pos), first(q_block), first(q_noisy), first(q_valid),
                                        first(k_pos), first(k_block), first(k_valid), first(k_noisy), None)
        if cache is not None and cache.mask_memo is not None:
            lengths, pos, block, valid, allowed = cache.mask_memo
            if (pos.shape == q_pos.shape and allowed.shape[-1] == k_pos.shape[1]
                    and torch.equal(lengths, cache.lengths) and torch.equal(pos, q_pos)
                    and torch.equal(block, q_block) and torch.equal(valid, q_valid)):
                return allowed
        allowed = attention_allowed(mode, q_pos, k_pos, q_block, k_block, k_valid, q_noisy, k_noisy)
        # A padding query may see nothing at all; let it see itself (its own slot) so softmax stays finite.
        lq, lk = q_pos.shape[1], k_pos.shape[1]
        own = torch.arange(lq, device=q_pos.device)
        slots = cache.window[2] if cache is not None else None
        if slots is None:
            allowed[:, 0, own, own + (lk - lq)] = True
        else:  # rows at their own cache lengths
            allowed[torch.arange(q_pos.shape[0], device=q_pos.device)[:, None], 0, own[None], slots] = True
        if cache is not None:
            cache.mask_memo = (cache.lengths.clone(), q_pos.clone(), q_block.clone(), q_valid.clone(),
                               allowed)
        return allowed


def _checkpoint(fn, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def wanted_tokens(rows: torch.Tensor, cols: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The tokens (rows[i], cols[i]) as [B, K] indices per row, ascending, K = the most any row has;
    shorter rows are filled up with tokens nobody reads (computed, never used)."""
    wanted = torch.zeros(batch, length, dtype=torch.bool, device=rows.device)
    wanted[rows, cols] = True
    k = int(wanted.sum(1).max())
    return wanted.long().argsort(dim=1, descending=True, stable=True)[:, :k]


def shift_sources(n: int, block_ids: torch.Tensor, two_halves: bool) -> torch.Tensor:
    """THE shift rule as indices: for each of the n query tokens, the input token whose head output is
    its logits ([B, n] long, into the forward's tokens). The previous token; in BD3 training
    (`two_halves`: the noisy half, then the clean half) a block start reads the clean copy of the token
    before it; the first token reads itself."""
    prev = (torch.arange(n, device=block_ids.device) - 1).clamp(min=0)[None].expand(block_ids.shape[0], -1)
    if not two_halves:
        return prev
    starts = torch.zeros_like(block_ids, dtype=torch.bool)
    starts[:, 1:] = block_ids[:, 1:] != block_ids[:, :-1]
    return torch.where(starts, prev + n, prev)


def shift_to_previous(raw: torch.Tensor, n: int, block_ids: torch.Tensor, past: KVCache | None,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for the n query tokens, each read from the token before it (shift_logits).

    raw: [B, n or 2n, V], the head's output per input token (with BD3 training, the noisy half then
    the clean half). Inside a block the predecessor is the previous input token. At a block start it
    is the last token of the block before, taken from the *clean* half in BD3 training (a clean
    token that saw only clean tokens, as the cache's tokens are at sampling time) or from the cache
    (`last_logits`): with a cache, each row's first real query token (after its padding, `valid`
    [B, n]) reads it. The very first token of a sequence has no predecessor and keeps its own logits.
    """
    src = shift_sources(n, block_ids, raw.shape[1] == 2 * n)
    out = raw.gather(1, src[..., None].expand(-1, -1, raw.shape[-1]))  # [B, n, V]
    if raw.shape[1] != 2 * n and past is not None and past.length and past.last_logits is not None:
        if valid is None or bool(valid[:, 0].all()):
            out = torch.cat([past.last_logits.to(out.dtype), out[:, 1:]], dim=1)
        else:
            first = valid.long().argmax(1)  # each row's first real query token
            rows = torch.arange(out.shape[0], device=out.device)
            out = out.clone()
            out[rows, first] = torch.where((past.lengths > 0)[:, None], past.last_logits[:, 0].to(out.dtype),
                                           out[rows, first])
    return out


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    AutoConfig.register(DiffusionTransformerConfig.model_type, DiffusionTransformerConfig, exist_ok=True)
    AutoModel.register(DiffusionTransformerConfig, DiffusionTransformer, exist_ok=True)
    AutoModelForMaskedLM.register(DiffusionTransformerConfig, DiffusionTransformer, exist_ok=True)


register_auto_classes()  # importing the model makes AutoConfig / AutoModel know it
