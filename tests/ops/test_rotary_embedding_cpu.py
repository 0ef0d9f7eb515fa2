"""rotary_embedding on the "cpu" backend (llmkern._C) against a naive float64 definition written here.

Each pair (a, b) -> (a cos - b sin, b cos + a sin) in float64 (the products of two floats are exact
there), rounded once to the tensor's dtype: the kernel matches it bit for bit, dims past R unchanged.
Outputs are NaN-poisoned; 1 and 2 threads (the larger cases take the OpenMP path); every ISA's row path
(AVX-512 vector rows, portable rows) pinned in turn through LLMKERN_CPU_ISA.
"""
import pytest
import torch

import llmkern
from llmkern.ops import OPS, rotary_cos_sin, strict

from _attention_helpers import poisoned_outputs
from _cpu_helpers import isa, threads  # noqa: F401 - fixtures

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def naive_rotate(x, positions, cs, interleaved):
    """x [..., H, D] -> rotated copy in x's dtype: each pair in float64, rounded once; dims R..D-1 unchanged."""
    R = cs.shape[1]
    half = R // 2
    out = x.clone()
    c_all = cs.double()[positions.long()]  # [..., R]: one angle set per token
    for i in range(half):
        ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        c, s = c_all[..., i, None], c_all[..., half + i, None]  # [..., 1], broadcast over heads
        a, b = x[..., ia].double(), x[..., ib].double()
        out[..., ia] = (a * c - b * s).to(x.dtype)
        out[..., ib] = (b * c + a * s).to(x.dtype)
    return out


def run(q, k, pos, cs, interleaved=False):
    with strict(), poisoned_outputs():
        qo, ko = llmkern.ops.rotary_embedding(q, k, pos, cs, interleaved, backend="cpu")
    assert OPS["rotary_embedding"].last_backend == "cpu"
    assert qo.is_contiguous() and ko.is_contiguous()
    return qo, ko


def check(q, k, pos, cs, interleaved=False):
    qo, ko = run(q, k, pos, cs, interleaved)
    assert bits_equal(qo, naive_rotate(q, pos, cs, interleaved)), "q differs"
    assert bits_equal(ko, naive_rotate(k, pos, cs, interleaved)), "k differs"


def data(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 40), (128, 70)])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("T", [1, 3, 17, 100])
def test_bit_exact(T, dtype, D, R, interleaved, threads, isa):
    q, k = data((T, 3, D), dtype, seed=T), data((T, 1, D), dtype, seed=T + 1)
    pos = torch.randint(0, 500, (T,), generator=torch.Generator().manual_seed(D))  # random: the gather is checked
    check(q, k, pos, rotary_cos_sin(500, R, base=10000.0), interleaved)


def test_batched_int32_positions_and_mixed_dtypes(threads):
    """[B, S, H, D] with int32 positions; q bf16 and k fp32 each keep their dtype."""
    B, S, D = 2, 17, 64
    q, k = data((B, S, 4, D), torch.bfloat16, seed=1), data((B, S, 2, D), torch.float32, seed=2)
    pos = torch.randint(0, 64, (B, S), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    check(q, k, pos, rotary_cos_sin(64, D, base=500000.0))


@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_inputs(interleaved, threads, isa):
    """q a head slice of a wider buffer (strides, no copy); k transposed in memory (copied); batched [B, S]."""
    B, S, Hq, Hk, D = 3, 5, 4, 2, 96
    q = data((B, S, Hq + 3, D), torch.float16, seed=4)[:, :, 1:Hq + 1]
    k = data((B, Hk, S, D), torch.float16, seed=5).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    pos = torch.randint(0, 40, (B, S), generator=torch.Generator().manual_seed(6))
    check(q, k, pos, rotary_cos_sin(40, 48), interleaved)


def test_position_zero_is_identity_and_nan_stays_in_its_row(isa):
    q, k = data((3, 2, 32), torch.float32, seed=7), data((3, 1, 32), torch.float32, seed=8)
    q[1, 0, 3] = float("nan")
    qo, ko = run(q, k, torch.tensor([0, 5, 9]), rotary_cos_sin(10, 32))
    assert bits_equal(qo[0], q[0]) and bits_equal(ko[0], k[0])
    assert torch.isnan(qo[1, 0]).sum() == 2  # the NaN's pair (3, 19), NeoX pairing
    assert not torch.isnan(qo[1, 1]).any() and not torch.isnan(qo[2]).any()


def test_rotary_dim_beyond_the_kernel_buffer_falls_back_in_strict_mode():
    q = torch.randn(1, 1, 1040)
    with strict(), pytest.raises(RuntimeError, match="strict mode forbids"):
        llmkern.ops.rotary_embedding(q, q.clone(), torch.tensor([1]), rotary_cos_sin(4, 1040), backend="cpu")


def test_launcher_rejects_bad_arguments():
    mod = llmkern._backends.cpu_module()
    q, k, qo, ko = torch.randn(2, 3, 8), torch.randn(2, 1, 8), torch.empty(2, 3, 8), torch.empty(2, 1, 8)
    cs, pos = rotary_cos_sin(4, 8), torch.tensor([1, 3])
    args = dict(q_ptr=q.data_ptr(), q_out_ptr=qo.data_ptr(), q_dtype=0, q_strides=[24, 8], Hq=3, k_ptr=k.data_ptr(),
                k_out_ptr=ko.data_ptr(), k_dtype=0, k_strides=[8, 8], Hk=1, T=2, D=8, cos_sin_ptr=cs.data_ptr(), R=8,
                positions_ptr=pos.data_ptr(), interleaved=False, num_threads=1)
    mod.rotary_embedding(**args)
    assert bits_equal(qo, naive_rotate(q, pos, cs, False)) and bits_equal(ko, naive_rotate(k, pos, cs, False))
    for bad, msg in [(dict(q_dtype=3), "q_dtype"), (dict(k_dtype=-1), "k_dtype"), (dict(q_strides=[24]), "2 strides"),
                     (dict(k_strides=[8, -1]), ">= 0"), (dict(R=7), "rotary dim"), (dict(R=10), "rotary dim"),
                     (dict(Hk=0), "Hk >= 1"), (dict(num_threads=0), "num_threads"),
                     (dict(positions_ptr=0), "positions_ptr is a null pointer"),
                     (dict(k_out_ptr=ko.data_ptr() + 2), "k_out_ptr is not aligned"), (dict(isa="sse9"), "isa")]:
        with pytest.raises(ValueError, match=msg):
            mod.rotary_embedding(**{**args, **bad})


@pytest.mark.parametrize("D,R", [(64, 64), (256, 200), (128, 18)])
def test_smollm2_prefill_shape_and_wide_heads(D, R, isa, threads):
    """The runtime's prefill shape (37 tokens, 9 + 3 heads) and head dims up to 256 with R not a multiple of
    16: the vector rows' tails; bf16 (the rounding after the rotation) and fp32."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k = data((37, 9, D), dtype, seed=D), data((37, 3, D), dtype, seed=D + 1)
        pos = torch.randint(0, 500, (37,), generator=torch.Generator().manual_seed(R))
        check(q, k, pos, rotary_cos_sin(500, R, base=10000.0))
