"""llmkern.ops.rotary_embedding (and rotary_cos_sin): reference vs naive float64, every backend vs the
reference, rotation properties, opcheck, bad inputs."""
import math

import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import rotary_cos_sin, strict

from _attention_helpers import on_device, run_on, TOL, assert_rel, backends, poisoned_outputs, randn

BACKENDS = backends("rotary_embedding")

# (leading shape, Hq, Hk, D, R): batched [B, S] and packed [T], full and partial rotary, head dims 32..256.
CASES = [
    ((2, 17), 4, 4, 64, 64),
    ((1, 1), 8, 1, 32, 32),
    ((33,), 6, 2, 80, 40),
    ((3, 5), 8, 2, 128, 64),
    ((100,), 2, 1, 256, 256),
    ((257,), 3, 1, 64, 16),
]


def _case_id(c):
    lead, Hq, Hk, D, R = c
    return f"{'x'.join(map(str, lead))}_H{Hq}x{Hk}_D{D}_R{R}"


def _inputs(case, dtype=torch.float32, pos_dtype=torch.int64, layout="contiguous", seed=0):
    lead, Hq, Hk, D, R = case
    torch.manual_seed(seed)
    max_pos = 300
    positions = torch.randint(0, max_pos, lead, dtype=pos_dtype)  # random, not arange: gathers are checked
    if layout == "contiguous" or len(lead) == 1:
        q = randn(*lead, Hq, D, dtype=dtype)
    else:
        q = randn(*lead, Hq, D, dtype=dtype, layout=layout)
    k = randn(*lead, Hk, D, dtype=dtype)
    return q, k, positions, rotary_cos_sin(max_pos, R, base=500.0)


def naive_rotate(x, positions, cs, interleaved):
    """Pair by pair in float64: (a, b) -> (a cos - b sin, b cos + a sin); dims past R unchanged."""
    R = cs.shape[1]
    out = x.double().clone()
    c_all = cs.double()[positions.long()]  # [..., R]
    for i in range(R // 2):
        ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + R // 2)
        c, s = c_all[..., i, None], c_all[..., R // 2 + i, None]  # [..., 1]: one angle per token, all heads
        a, b = x[..., ia].double(), x[..., ib].double()
        out[..., ia] = a * c - b * s
        out[..., ib] = b * c + a * s
    return out


# ---------------------------------------------------------------- (1) reference vs naive


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_naive(case, dtype, interleaved):
    q, k, pos, cs = _inputs(case, dtype)
    qr, kr = reference.rotary_embedding(q, k, pos, cs, interleaved)
    R = cs.shape[1]
    for x, out in ((q, qr), (k, kr)):
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert_rel(out, naive_rotate(x, pos, cs, interleaved), TOL[dtype])
        assert torch.equal(out[..., R:], x[..., R:]), "dims past the rotary dim pass through unchanged"


def test_reference_non_contiguous_and_int32_positions():
    q, k, pos, cs = _inputs(CASES[3], pos_dtype=torch.int32, layout="transposed")
    qr, kr = reference.rotary_embedding(q, k, pos, cs, False)
    assert_rel(qr, naive_rotate(q, pos, cs, False), TOL[torch.float32])
    assert_rel(kr, naive_rotate(k, pos, cs, False), TOL[torch.float32])


def test_neox_and_gptj_pairings_differ():
    """Guards the naive comparison: the two pairings are not silently the same computation."""
    q, k, pos, cs = _inputs(CASES[0])
    a, _ = reference.rotary_embedding(q, k, pos, cs, False)
    b, _ = reference.rotary_embedding(q, k, pos, cs, True)
    assert (a - b).norm() > 0.1 * a.norm()


def _inv_freq_naive(R, base, scaling):
    """Frequencies by the Llama 3 / linear definitions, one at a time in float64."""
    freqs = []
    for i in range(R // 2):
        f = base ** (-2.0 * i / R)
        if scaling and scaling["type"] == "linear":
            f /= scaling["factor"]
        elif scaling and scaling["type"] == "llama3":
            old = scaling["original_max_position_embeddings"]
            lo_wl, hi_wl = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
            wl = 2 * math.pi / f
            if wl > lo_wl:
                f /= scaling["factor"]
            elif wl >= hi_wl:
                smooth = (old / wl - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
                f = (1 - smooth) * f / scaling["factor"] + smooth * f
        freqs.append(f)
    return freqs


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0},
                                     {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}], ids=["none", "linear", "llama3"])
def test_rotary_cos_sin_matches_definition(scaling):
    R, base, P = 64, 10000.0, 1000
    cs = rotary_cos_sin(P, R, base, scaling=scaling)
    assert cs.shape == (P, R) and cs.dtype == torch.float32
    freqs = torch.tensor(_inv_freq_naive(R, base, scaling), dtype=torch.float64)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * freqs[None, :]
    torch.testing.assert_close(cs.double(), torch.cat([ang.cos(), ang.sin()], 1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (2) every backend vs the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backend_matches_reference(backend, case, dtype, interleaved):
    q, k, pos, cs = _inputs(case, dtype, pos_dtype=torch.int32 if case[3] == 80 else torch.int64, seed=1)
    with strict(), poisoned_outputs():
        qb, kb = run_on(backend, llmkern.ops.rotary_embedding, q, k, pos, cs, interleaved, backend=backend)
    assert llmkern.ops.OPS["rotary_embedding"].last_backend == backend
    qr, kr = reference.rotary_embedding(q, k, pos, cs, interleaved)
    R = cs.shape[1]
    for out, ref in ((qb, qr), (kb, kr)):
        assert out.dtype == dtype and out.shape == ref.shape
        assert_rel(out, ref, TOL[dtype])
        assert torch.equal(out[..., R:], ref[..., R:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_backend_non_contiguous(backend, layout):
    q, k, pos, cs = _inputs(CASES[3], layout=layout, seed=2)
    with strict(), poisoned_outputs():
        qb, kb = run_on(backend, llmkern.ops.rotary_embedding, q, k, pos, cs, False, backend=backend)
    qr, kr = reference.rotary_embedding(q.contiguous(), k, pos, cs, False)
    assert_rel(qb, qr, TOL[torch.float32])
    assert_rel(kb, kr, TOL[torch.float32])


# ---------------------------------------------------------------- (3) properties


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_relative_position(backend, interleaved):
    """<rot(q, m), rot(k, n)> == <rot(q, m + c), rot(k, n + c)>, and rotation keeps each head's norm."""
    torch.manual_seed(3)
    T, H, D = 17, 2, 64
    q, k = randn(T, H, D), randn(T, H, D)
    cs = rotary_cos_sin(400, D, base=500.0)
    m, n = torch.randint(0, 200, (T,)), torch.randint(0, 200, (T,))
    shift = torch.randint(1, 200, (T,))
    with strict():
        q1, _ = run_on(backend, llmkern.ops.rotary_embedding, q, q, m, cs, interleaved, backend=backend)
        k1, _ = run_on(backend, llmkern.ops.rotary_embedding, k, k, n, cs, interleaved, backend=backend)
        q2, _ = run_on(backend, llmkern.ops.rotary_embedding, q, q, m + shift, cs, interleaved, backend=backend)
        k2, _ = run_on(backend, llmkern.ops.rotary_embedding, k, k, n + shift, cs, interleaved, backend=backend)
    dot1, dot2 = (q1.double() * k1.double()).sum(-1), (q2.double() * k2.double()).sum(-1)  # [T, H]
    assert_rel(dot2, dot1, 1e-5, "relative-position scores")
    assert_rel(q1.norm(dim=-1), q.norm(dim=-1), 1e-5, "norms")


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_zero_is_identity_and_batched_equals_packed(backend):
    q, k, pos, cs = _inputs(CASES[0], seed=4)
    with strict():
        q0, k0 = run_on(backend, llmkern.ops.rotary_embedding, q, k, torch.zeros_like(pos), cs, backend=backend)
        qb, kb = run_on(backend, llmkern.ops.rotary_embedding, q, k, pos, cs, backend=backend)
        qp, kp = run_on(backend, llmkern.ops.rotary_embedding, q.reshape(34, 4, 64), k.reshape(34, 4, 64), pos.reshape(34), cs,
                                              backend=backend)
    torch.testing.assert_close(q0, q, rtol=0, atol=0)  # cos 0 = 1 and sin 0 = 0 exactly in the cache
    torch.testing.assert_close(k0, k, rtol=0, atol=0)
    assert torch.equal(qp.reshape(q.shape), qb) and torch.equal(kp.reshape(k.shape), kb)


# ---------------------------------------------------------------- (4) opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_opcheck(backend, interleaved):
    q, k, pos, cs = _inputs(((2, 5), 4, 2, 32, 16), seed=5)
    torch.library.opcheck(torch.ops.llmkern.rotary_embedding.default,
                          *on_device(backend, (q, k, pos, cs), dict(interleaved=interleaved, backend=backend)))


# ---------------------------------------------------------------- (5) bad inputs


def test_positions_out_of_range():
    q, k, pos, cs = _inputs(CASES[0])
    with pytest.raises(ValueError, match=r"positions must be in 0\.\.299"):
        llmkern.ops.rotary_embedding(q, k, pos + 300, cs)
    with pytest.raises(ValueError, match="positions must be in"):
        llmkern.ops.rotary_embedding(q, k, pos - 300, cs)


def test_positions_shape_and_dtype():
    q, k, pos, cs = _inputs(CASES[0])
    with pytest.raises(ValueError, match="positions must have shape"):
        llmkern.ops.rotary_embedding(q, k, pos[:, :3], cs)
    with pytest.raises(TypeError, match="positions must have dtype"):
        llmkern.ops.rotary_embedding(q, k, pos.float(), cs)


def test_q_rank_too_small():
    q, k, pos, cs = _inputs(CASES[2])
    with pytest.raises(ValueError, match=r"q must be \[\.\.\., H, D\]"):
        llmkern.ops.rotary_embedding(q[0], k[0], pos, cs)


def test_k_shape_mismatch():
    q, k, pos, cs = _inputs(CASES[0])
    with pytest.raises(ValueError, match="k must have shape"):
        llmkern.ops.rotary_embedding(q, k[:, :5], pos, cs)
    with pytest.raises(ValueError, match="k must have shape"):
        llmkern.ops.rotary_embedding(q, k[..., :32], pos, cs)


def test_cos_sin_cache_bad_width_and_dtype():
    q, k, pos, cs = _inputs(CASES[0])
    with pytest.raises(ValueError, match="cos_sin_cache width"):
        llmkern.ops.rotary_embedding(q, k, pos, torch.zeros(300, 66))
    with pytest.raises(ValueError, match="cos_sin_cache width"):
        llmkern.ops.rotary_embedding(q, k, pos, torch.zeros(300, 31))
    with pytest.raises(TypeError, match="cos_sin_cache must have dtype float32"):
        llmkern.ops.rotary_embedding(q, k, pos, cs.half())
    with pytest.raises(ValueError, match="cos_sin_cache must have rank 2"):
        llmkern.ops.rotary_embedding(q, k, pos, cs[None])


def test_int_q_dtype():
    q, k, pos, cs = _inputs(CASES[0])
    with pytest.raises(TypeError, match="q must have dtype"):
        llmkern.ops.rotary_embedding(q.int(), k, pos, cs)


def test_rotary_cos_sin_bad_arguments():
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        rotary_cos_sin(10, 7)
    with pytest.raises(ValueError, match="unsupported scaling type"):
        rotary_cos_sin(10, 8, scaling={"type": "yarn"})
