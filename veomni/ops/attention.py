"""Attention with an explicit mode, on several backends.

Why this module exists: Open-dLLM sets `is_causal=False` but HF's mask builder ignores it, so with
sdpa + a padding mask (or eager with any mask) its "bidirectional" model silently stays causal
(NOTES §4). Here the mode is an argument of every call and the mask is built from
(mode, padding, packed segments, cache positions) in one place, `allowed_mask`, that every backend
either uses directly (eager, sdpa) or re-expresses (flex mask_mod, flash-attn varlen).

Modes
  causal        key row index <= query row index
  bidirectional every key
  block_causal  key block <= query block, block = position_id // block_size (full attention inside a
                block, causal across blocks: Fast-dLLM v2 / BD3-LM shape). Blocks follow position ids,
                so they restart with every packed document and ignore left padding.
                Two-stream rows (block-diffusion training, veomni/diffusion/bd3lm.py): a row holds
                [x_t ; x_0], the noisy copy and the clean copy of the same tokens with the same
                position ids, and `clean` marks the x_0 half. Then (BD3-LM's mask)
                  noisy query -> noisy key   same block only (bidirectional inside the block)
                  noisy query -> clean key   earlier blocks only (the clean history)
                  clean query -> clean key   key block <= query block (block-causal)
                  clean query -> noisy key   never
                so a noisy block is denoised from clean history, never from another noisy block.
Always combined with: key padding (attention_mask) and, for packed rows, same-segment only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

ATTN_MODES = ("causal", "bidirectional", "block_causal")
ATTN_IMPLS = ("sdpa", "eager", "flex", "flash_attention_2")

# (mode, impl) pairs that are not implemented. Anything listed here raises instead of quietly
# running another mode.
_UNSUPPORTED = {
    ("block_causal", "flash_attention_2"): "flash-attn has no block-causal mask; use sdpa or flex",
}


class AttentionConfigError(ValueError):
    pass


def check_attention(mode: str, impl: str, block_size: Optional[int] = None) -> None:
    """Raise a clear error for an unknown mode/impl or an unsupported pair."""
    if mode not in ATTN_MODES:
        raise AttentionConfigError(
            f"attn_mode={mode!r} is not one of {ATTN_MODES}. Pass it explicitly to the model call "
            "(e.g. attn_mode='bidirectional' for a diffusion LM, 'causal' for AR)."
        )
    if impl not in ATTN_IMPLS:
        raise AttentionConfigError(f"attn_impl={impl!r} is not one of {ATTN_IMPLS}.")
    if (mode, impl) in _UNSUPPORTED:
        raise AttentionConfigError(
            f"attn_mode={mode!r} is not supported with attn_impl={impl!r}: {_UNSUPPORTED[(mode, impl)]}."
        )
    if mode == "block_causal":
        if block_size is None or int(block_size) <= 0:
            raise AttentionConfigError(
                f"attn_mode='block_causal' needs a positive block_size (got {block_size!r})."
            )
    if impl == "flash_attention_2":
        _import_flash_attn()


def _import_flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise AttentionConfigError(
            "attn_impl='flash_attention_2' needs the flash-attn package, which is not installed "
            f"({e}). Install it with `pip install -e .[gpu]` on a CUDA machine, or use "
            "attn_impl='sdpa'."
        ) from e
    return flash_attn_func, flash_attn_varlen_func


@dataclass
class AttnMeta:
    """Everything a backend needs to know about which key each query may see.

    q_idx/k_idx are row indices (0..S-1 of the full sequence; with a KV cache the queries are a
    slice of the row). q_pos/k_pos are position ids, used for block ids. k_valid marks real
    (non-padding) keys; q_seg/k_seg number packed documents (None when rows are not packed).
    """

    mode: str
    block_size: Optional[int]
    q_idx: torch.Tensor  # [Sq]
    k_idx: torch.Tensor  # [Sk]
    q_pos: torch.Tensor  # [B, Sq]
    k_pos: torch.Tensor  # [B, Sk]
    k_valid: Optional[torch.Tensor] = None  # [B, Sk] bool
    q_seg: Optional[torch.Tensor] = None  # [B, Sq]
    k_seg: Optional[torch.Tensor] = None  # [B, Sk]
    q_clean: Optional[torch.Tensor] = None  # [B, Sq] bool: the x_0 half of a two-stream row
    k_clean: Optional[torch.Tensor] = None  # [B, Sk] bool

    @property
    def is_plain_causal(self) -> bool:
        """Causal over the whole row with no padding, segments or cache offset (fast path)."""
        return (
            self.mode == "causal"
            and self.k_valid is None
            and self.q_seg is None
            and self.q_idx.numel() == self.k_idx.numel()
        )

    @property
    def is_full(self) -> bool:
        """Every query sees every key: no mask needed at all."""
        return self.mode == "bidirectional" and self.k_valid is None and self.q_seg is None


def allowed_mask(meta: AttnMeta) -> torch.Tensor:
    """Boolean [B, 1, Sq, Sk] mask, True where the query may attend to the key."""
    q_idx, k_idx = meta.q_idx, meta.k_idx
    bsz = meta.q_pos.shape[0]
    sq, sk = q_idx.numel(), k_idx.numel()
    if meta.mode == "causal":
        allowed = (k_idx[None, :] <= q_idx[:, None]).expand(bsz, sq, sk)
    elif meta.mode == "bidirectional":
        allowed = torch.ones(bsz, sq, sk, dtype=torch.bool, device=q_idx.device)
    else:  # block_causal
        qb = torch.div(meta.q_pos, meta.block_size, rounding_mode="floor")[:, :, None]
        kb = torch.div(meta.k_pos, meta.block_size, rounding_mode="floor")[:, None, :]
        if meta.q_clean is None:
            allowed = kb <= qb
        else:
            qc, kc = meta.q_clean[:, :, None], meta.k_clean[:, None, :]
            allowed = ((~qc & ~kc & (kb == qb)) | (~qc & kc & (kb < qb)) | (qc & kc & (kb <= qb)))
    if meta.q_seg is not None:
        allowed = allowed & (meta.q_seg[:, :, None] == meta.k_seg[:, None, :])
    if meta.k_valid is not None:
        allowed = allowed & meta.k_valid[:, None, :]
    # A query that may see nothing (a left-pad position in causal mode) would make softmax NaN and
    # the NaN then leaks into gradients through 0 * NaN. Such rows are padding whose outputs are
    # never read, so let them attend everywhere instead.
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty
    return allowed[:, None, :, :]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def eager_attention(q, k, v, meta: AttnMeta, scale: float) -> torch.Tensor:
    """Reference implementation: explicit scores, fp32 softmax. q [B,H,Sq,D], k/v [B,Hkv,Sk,D]."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if not meta.is_full:
        scores = scores.masked_fill(~allowed_mask(meta), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, meta: AttnMeta, scale: float) -> torch.Tensor:
    enable_gqa = q.shape[1] != k.shape[1]
    if meta.is_full:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)
    if meta.is_plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed_mask(meta), scale=scale, enable_gqa=enable_gqa
    )


def flex_attention(q, k, v, meta: AttnMeta, scale: float, compiled: Optional[bool] = None) -> torch.Tensor:
    """torch flex_attention with a mask_mod that states the same rule as `allowed_mask`.

    compiled: run torch.compile's fused flex kernel (default: on CUDA only; True on CPU is the
    inductor C++ kernel, forward only, which tests/ops/test_flex_compiled.py checks against sdpa).

    flex returns zeros for a query that sees no key (instead of NaN), so the empty-row fix of
    `allowed_mask` is not needed here; such rows are padding and their outputs are never read.
    Note: on CPU, torch 2.13 runs flex forward-only (no backward); train with sdpa or eager there.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex

    q_idx, k_idx, bs = meta.q_idx, meta.k_idx, meta.block_size
    if meta.mode == "block_causal":
        qb = torch.div(meta.q_pos, bs, rounding_mode="floor")
        kb = torch.div(meta.k_pos, bs, rounding_mode="floor")

    def mask_mod(b, h, qi, ki):
        if meta.mode == "causal":
            ok = k_idx[ki] <= q_idx[qi]
        elif meta.mode == "block_causal" and meta.q_clean is not None:  # two-stream rows (see top)
            qc, kc, q_b, k_b = meta.q_clean[b, qi], meta.k_clean[b, ki], qb[b, qi], kb[b, ki]
            ok = (~qc & ~kc & (k_b == q_b)) | (~qc & kc & (k_b < q_b)) | (qc & kc & (k_b <= q_b))
        elif meta.mode == "block_causal":
            ok = kb[b, ki] <= qb[b, qi]
        else:
            ok = qi >= 0  # always true, keeps the tensor type flex expects
        if meta.q_seg is not None:
            ok = ok & (meta.q_seg[b, qi] == meta.k_seg[b, ki])
        if meta.k_valid is not None:
            ok = ok & meta.k_valid[b, ki]
        return ok

    bsz, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    block_mask = create_block_mask(mask_mod, B=bsz, H=None, Q_LEN=sq, KV_LEN=sk, device=q.device)
    # Uncompiled flex materialises the full score matrix (fine for CPU tests); on GPU use the fused
    # kernel that torch.compile generates.
    fn = _compiled_flex(_flex) if (q.is_cuda if compiled is None else compiled) else _flex
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_COMPILED = {}


def _compiled_flex(fn):
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(fn, dynamic=False)
    return _COMPILED["flex"]


def flash_attention(q, k, v, meta: AttnMeta, scale: float) -> torch.Tensor:  # pragma: no cover - GPU
    """flash-attn 2: plain rows via flash_attn_func, padded/packed rows via the varlen kernel."""
    flash_attn_func, flash_attn_varlen_func = _import_flash_attn()
    causal = meta.mode == "causal"
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, S, H, D]
    if meta.k_valid is None and meta.q_seg is None:
        out = flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    if q.shape[2] != k.shape[2]:
        raise AttentionConfigError(
            "flash_attention_2 with padding/packing and a KV cache is not supported; use sdpa."
        )
    # Each (row, segment) run of real tokens becomes one varlen sequence. Segments are contiguous
    # by construction of the packer; padding (segment 0 / invalid keys) is dropped.
    bsz, slen = q.shape[0], q.shape[2]
    seg = meta.q_seg if meta.q_seg is not None else torch.ones(bsz, slen, dtype=torch.long, device=q.device)
    if meta.k_valid is not None:
        seg = seg.masked_fill(~meta.k_valid, 0)
    keep = seg.reshape(-1) > 0
    flat_seg = (seg + torch.arange(bsz, device=q.device)[:, None] * (slen + 1)).reshape(-1)[keep]
    _, counts = torch.unique_consecutive(flat_seg, return_counts=True)
    cu = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    max_len = int(counts.max())
    sel = lambda x: x.reshape(bsz * slen, *x.shape[2:])[keep]  # noqa: E731
    out_packed = flash_attn_varlen_func(
        sel(qt), sel(kt), sel(vt), cu, cu, max_len, max_len, softmax_scale=scale, causal=causal
    )
    out = qt.new_zeros(bsz * slen, *qt.shape[2:])
    out[keep] = out_packed
    return out.reshape(bsz, slen, *qt.shape[2:]).transpose(1, 2)


BACKENDS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "flash_attention_2": flash_attention,
}


def attention(q, k, v, meta: AttnMeta, impl: str, scale: float) -> torch.Tensor:
    """q [B,H,Sq,D], k/v [B,Hkv,Sk,D] -> [B,H,Sq,D] under `meta`'s mode on backend `impl`."""
    return BACKENDS[impl](q, k, v, meta, scale)
