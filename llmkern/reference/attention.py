"""Reference attention (pure PyTorch); semantics in llmkern/ops/attention.py.

The math lives in two helpers that decode_attention.py reuses, so the masking and softmax rules are
written once:
- `visible(q_pos, k_pos, k_len, ...)`: which keys each query sees (bottom-right aligned band).
- `masked_attention(q, k, v, mask, scale, softcap)`: softmax(q k^T * scale) v over the visible keys,
  with GQA by head grouping, returning the output and the log-sum-exp.
Everything is computed in float64 (float32 only for very large problems, see `compute_dtype`), then
rounded once to q's dtype; the lse is returned as float32.
"""
from __future__ import annotations

import math

import torch

# Above this many multiply-adds float64 gets slow/large; fall back to float32 (DESIGN.md allows it).
_FLOAT64_WORK_LIMIT = 2**34
# Rows of queries per chunk are chosen so that one chunk's score matrix stays below this many elements.
_SCORE_CHUNK_ELEMS = 2**25


def compute_dtype(work: int) -> torch.dtype:
    """float64 for the ground truth, float32 when `work` (multiply-adds) would make float64 too slow."""
    return torch.float64 if work <= _FLOAT64_WORK_LIMIT else torch.float32


def visible(q_pos: torch.Tensor, k_len: torch.Tensor, num_keys: int, *, causal: bool, window_left: int,
            window_right: int) -> torch.Tensor:
    """Bool mask [N, Sq, Sk]: key j visible to query row t.

    q_pos [N, Sq] int64: the position of each query in key coordinates (i + Sk - Sq for bottom-right
    alignment); k_len [N] int64: number of real keys of each row group (keys j >= k_len are padding).
    A key j is visible iff j < k_len, j <= q_pos + right and (window_left < 0 or j >= q_pos - window_left),
    where right = 0 when causal, window_right when >= 0, else unbounded.
    """
    j = torch.arange(num_keys, device=q_pos.device)[None, None, :]  # [1, 1, Sk]
    pos = q_pos[:, :, None]  # [N, Sq, 1]
    mask = j < k_len[:, None, None]
    right = 0 if causal else window_right
    if right >= 0:
        mask = mask & (j <= pos + right)
    if window_left >= 0:
        mask = mask & (j >= pos - window_left)
    # Without a causal / window term the mask is still [N, 1, Sk]: give it its query rows (masked_attention
    # slices them in chunks; a broadcast row has none past the first).
    return mask.expand(pos.shape[0], pos.shape[1], num_keys)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over visible keys of (capped) q k^T * scale, times v.

    q [N, Hq, Sq, D], k/v [N, Hk, Sk, D] in the compute dtype, mask bool [N, Sq, Sk].
    Query head h reads key head h // (Hq // Hk). Returns out [N, Hq, Sq, D] and lse [N, Hq, Sq] in the
    compute dtype; a row with no visible key gets out 0 and lse -inf.
    """
    N, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    G = Hq // Hk
    # Group the query heads that share one key head instead of repeating k/v G times:
    # q [N, Hk, G, Sq, D] against k [N, Hk, 1, Sk, D].
    qg = q.reshape(N, Hk, G, Sq, D)
    kg, vg = k[:, :, None], v[:, :, None]
    out = q.new_zeros((N, Hk, G, Sq, D))
    lse = q.new_full((N, Hk, G, Sq), -math.inf)
    rows = max(1, _SCORE_CHUNK_ELEMS // max(1, N * Hq * Sk))
    for t0 in range(0, Sq, rows):
        t1 = min(Sq, t0 + rows)
        s = torch.matmul(qg[:, :, :, t0:t1], kg.transpose(-1, -2)) * scale  # [N, Hk, G, t, Sk]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        m = mask[:, None, None, t0:t1]  # [N, 1, 1, t, Sk]
        s = s.masked_fill(~m, -math.inf)
        row_lse = torch.logsumexp(s, dim=-1)  # [N, Hk, G, t]; -inf where nothing is visible
        # exp(s - lse) is NaN for a fully masked row (-inf - -inf): shift by 0 there and zero the weights. (Only
        # there: a +inf score must give NaN weights, as softmax does, not inf ones.)
        shift = torch.where(row_lse == -math.inf, torch.zeros_like(row_lse), row_lse)
        p = torch.exp(s - shift[..., None]).masked_fill(~m, 0.0)
        out[:, :, :, t0:t1] = torch.matmul(p, vg)
        lse[:, :, :, t0:t1] = row_lse
    return out.reshape(N, Hq, Sq, D), lse.reshape(N, Hq, Sq)


def _one_batch(q, k, v, scale, causal, window_left, window_right, softcap, dtype):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hk, D] -> out [B, Sq, Hq, D] (dtype), lse [B, Hq, Sq] (dtype)."""
    B, Sq = q.shape[0], q.shape[1]
    Sk = k.shape[1]
    # Bottom-right alignment: query i sits at key position i + Sk - Sq.
    q_pos = (torch.arange(Sq, device=q.device) + (Sk - Sq))[None, :].expand(B, Sq)
    k_len = torch.full((B,), Sk, device=q.device, dtype=torch.int64)
    mask = visible(q_pos, k_len, Sk, causal=causal, window_left=window_left, window_right=window_right)
    out, lse = masked_attention(q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2),
                                v.to(dtype).transpose(1, 2), mask, scale, softcap)
    return out.transpose(1, 2), lse


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap):
    """Returns (out like q, lse float32 [B, Hq, Sq] or [Hq, Tq]); see llmkern/ops/attention.py."""
    D, Hq = q.shape[-1], q.shape[-2]
    scale = D ** -0.5 if scale is None else float(scale)
    softcap = float(softcap)
    if q.dim() == 4:
        dtype = compute_dtype(q.shape[:-1].numel() * k.shape[1] * D)  # B * Sq * Hq * Sk * D multiply-adds
        out, lse = _one_batch(q, k, v, scale, causal, window_left, window_right, softcap, dtype)
        # Outputs are contiguous (the fake kernel promises q.new_empty(q.shape)).
        return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()

    # Packed varlen: q [Tq, Hq, D], k/v [Tk, Hk, D]; sequence b is rows cu[b]:cu[b+1].
    # Rows past cu_seqlens_q[-1] belong to no sequence: they see no key (out 0, lse -inf).
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dtype = compute_dtype(sum((cq[b + 1] - cq[b]) * (ck[b + 1] - ck[b]) for b in range(len(cq) - 1)) * Hq * D)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        # One sequence as a batch of 1: [1, Sq_b, Hq, D] against [1, Sk_b, Hk, D] (Sk_b may be 0).
        out_b, lse_b = _one_batch(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale, causal, window_left,
                                  window_right, softcap, dtype)
        out[q0:q1] = out_b[0].to(q.dtype)
        lse[:, q0:q1] = lse_b[0].to(torch.float32)
    return out, lse
