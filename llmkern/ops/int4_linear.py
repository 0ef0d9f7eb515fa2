"""`int4_linear`: y = x @ dequant(w)^T (+ bias) with 4-bit weights in llmkern's canonical layout.

Canonical int4 layout (see llmkern/formats/README.md):
- qweight uint8 [N, K // 2]: byte j of row n holds q[n, 2j] in its low nibble and q[n, 2j+1] in its
  high nibble, q in 0..15;
- scales, offsets float32 [N, K // G], G in {32, 64, 128}:
  dequant(q) = q * scale + offset  ( = (q - zero) * scale with zero = -offset / scale, fractional ).
Storing the offset rather than the zero point keeps GGUF Q4_0/Q4_1 and GPTQ/AWQ integer zeros
bit-exact: each product and the one addition are exact or rounded exactly as their own dequantizers do.

Modes:
- "w4a16" (default): x stays float; the weights are dequantized on the fly.
- "w4a8": each row of x is first quantized to int8 exactly as int8_linear's W8A8 does (symmetric,
  scale_x = max|x_row| / 127, round half to even) and the result is that row, dequantized, times
  dequant(w)^T. The CPU kernel computes it with integer dot products (int4 x int8, exact int32 per
  weight group), much cheaper than dequantizing the weights to float when several rows share them
  (batched decode, prefill).
- "w4a8g": the same with one activation scale per group of G values of a row (the weights' groups)
  instead of per row: LLM hidden states have outlier channels that a per-row scale lets swamp the rest
  of the row (on SmolLM2 per-row W4A8 changes greedy answers; per group it is ~10 dB more exact per
  layer). Same kernel and speed.
The extra error of both is measured in docs/notes/cpu-w4a8.md. CPU only (cpu backend, or the
reference anywhere); the GPU backends decline them.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .. import _backends
from .. import reference
from . import _checks as C
from ._registry import _PLAIN, BackendUnsupported, defop, needs_grad
from ._cpu_linear import DTYPE_CODE as _DTYPE_CODE
from ._int4_cpu import (  # noqa: F401 (tests, benchmarks and notes import the runners from here)
    _aligned_bytes, _cpu_pack, _cpu_pack_rows16, _cpu_runner, _cpu_unpack_rows16, _cpu_w4a8_runner, _rows16_limits,
    _scale_bytes)
from .int8_linear import _cuda_rows, _num_sms

GROUP_SIZES = (32, 64, 128)
MODES = ("w4a16", "w4a8", "w4a8g")
_W4A8 = ("w4a8", "w4a8g")


_FLOATS = C.FLOAT_SET


def _cpu_fast_ok(x, qweight, scales, offsets, bias, mode) -> bool:
    """Everything _check verifies, in one pass, for plain CPU tensors that autograd does not track (the
    weights may be nn.Parameters): ~1 us instead of ~4.5 (the op's `fast_check`, see defop). False:
    _check's own code runs, with its messages."""
    P = _PLAIN
    if not (type(x) in P and type(qweight) in P and type(scales) in P and type(offsets) in P and x.is_cpu
            and qweight.is_cpu and scales.is_cpu and offsets.is_cpu):
        return False
    if not (x.dtype in _FLOATS and qweight.dtype == torch.uint8 and scales.dtype == torch.float32
            and offsets.dtype == torch.float32 and qweight.dim() == 2 and scales.dim() == 2 and x.dim() >= 1):
        return False
    N, K = qweight.shape[0], qweight.shape[1] * 2
    ss = scales.shape
    if x.shape[-1] != K or ss[0] != N or offsets.shape != ss or ss[1] == 0 or K % ss[1] or K // ss[1] not in GROUP_SIZES:
        return False
    if bias is not None and not (type(bias) in P and bias.is_cpu and bias.dtype in _FLOATS and bias.shape == (N,)):
        return False
    return mode in MODES and not needs_grad(x, qweight, scales, offsets, bias)


def _check(x, qweight, scales, offsets, bias, mode):
    op = "int4_linear"
    if _cpu_fast_ok(x, qweight, scales, offsets, bias, mode):
        return
    C.tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"llmkern.{op}: x must have rank >= 1 ([..., K]), got shape {tuple(x.shape)}")
    C.tensor(op, "qweight", qweight, ranks=(2,), dtypes=(torch.uint8,))
    N, K = qweight.shape[0], qweight.shape[1] * 2
    C.shape(op, "x", x, tuple([None] * (x.dim() - 1)) + (K,), "last dim must be K = 2 * qweight.shape[1]")
    C.tensor(op, "scales", scales, ranks=(2,), dtypes=(torch.float32,))
    C.shape(op, "scales", scales, (N, None), "[N, K // group_size]")
    groups = scales.shape[1]
    if groups == 0 or K % groups != 0 or K // groups not in GROUP_SIZES:
        got = "no groups" if groups == 0 else f"K={K} over {groups} groups"
        raise ValueError(f"llmkern.{op}: group size (K / scales.shape[1]) must be one of {GROUP_SIZES}, got {got}")
    C.tensor(op, "offsets", offsets, ranks=(2,), dtypes=(torch.float32,))
    C.shape(op, "offsets", offsets, tuple(scales.shape), "same as scales")
    if bias is not None:
        C.tensor(op, "bias", bias, ranks=(1,), dtypes=C.FLOAT_DTYPES)
        C.shape(op, "bias", bias, (N,))
    if mode not in MODES:
        raise ValueError(f"llmkern.{op}: mode must be one of {MODES}, got {mode!r}")
    C.same_device(op, x=x, qweight=qweight, scales=scales, offsets=offsets, bias=bias)


def _fake(x, qweight, scales, offsets, bias, mode):
    return x.new_empty(x.shape[:-1] + (qweight.shape[0],))


int4_linear_op = defop(
    "int4_linear",
    "(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, Tensor? bias=None, str mode=\"w4a16\", "
    "str? backend=None) -> Tensor",
    check=_check,
    fake=_fake,
    fast_check=_cpu_fast_ok,
)


@int4_linear_op.backend("reference")
def _reference(x, qweight, scales, offsets, bias, mode):
    return reference.int4_linear(x, qweight, scales, offsets, bias, mode)


@int4_linear_op.backend("triton")
def _triton(x, qweight, scales, offsets, bias, mode):
    """Triton W4A16 kernel on CUDA tensors (llmkern.triton_kernels imported lazily: it needs triton)."""
    from ..triton_kernels import int4_linear as tk

    if x.device.type != "cuda":
        raise BackendUnsupported(f"triton runs on CUDA tensors, x is on {x.device}")
    if mode != "w4a16":
        raise BackendUnsupported(f"mode {mode!r} runs on the CPU only (triton has W4A16)")
    return tk.int4_linear(x, qweight, scales, offsets, bias)


@int4_linear_op.backend("cpu")
def _cpu(x, qweight, scales, offsets, bias, mode):
    """Launch the C++ kernel on raw pointers. W4A16 reads the canonical layout (nothing repacked per
    call); W4A8 packs the weights into its layout on every call (a full pass over them: use
    Int4Linear, whose prepared call packs once, for speed)."""
    if not x.is_cpu:  # (is_cpu: no torch.device object built, ~0.2 us)
        raise BackendUnsupported(f"x is on {x.device}")
    if qweight.shape[0] == 0:  # (an empty weight has no data pointer to bind: the reference returns [..., 0])
        raise BackendUnsupported("N = 0")
    if mode in _W4A8:
        return _cpu_w4a8_runner(qweight, scales, offsets, bias, mode == "w4a8g")(x)
    return _cpu_runner(qweight, scales, offsets, bias, pack=False)(x)


@int4_linear_op.preparer("cpu")
def _cpu_prepare(qweight, scales, offsets, bias, mode):
    """The cpu preparer (Int4Linear's prepared call). On AVX-512 CPUs the decode calls (1 to 16 rows)
    read one of two layouts packed from the canonical tensors, which stay unless released (below):

    rows16 (`_cpu_runner`, csrc/include/llmkern/cpu/int4_linear_rows16.h: one output row per vector lane),
      read by fp32 / fp16 x of 1 to 8 rows and, with AVX-512 BF16, bf16 x of 1 to 16 rows (and, once there, by
      the prefill: the same panels as from the canonical tensors, 1.00-1.05x their speed); packed here where
      it replaces the packed layout (AVX-512 BF16), else at the first call that reads it: 1-16% faster than the packed layout at one row, 1.3-1.8x at 4 to 16
      (docs/notes/cpu-int4-decode-compute.md). Results equal the canonical kernel's (the module's first
      call, through the op) to fp32 rounding. LLMKERN_INT4_ROWS16=0 turns it off. Memory: ~83% of the
      canonical int4 tensors once packed (fp32 scales; less with fp16 scales, and with GGUF Q4_K's, which
      it stores factored: 4.75 bits per weight, `_cpu_pack_rows16`).
    the packed lane = k layout (one-row calls), only where rows16 does not cover bf16 x at one row (no
      AVX-512 BF16, or LLMKERN_INT4_ROWS16=0), packed at preparation:
      LLMKERN_INT4_PACK unset: when every scale and offset is an fp16 value (GGUF Q4_0/Q4_1 imports),
        where its stream is smallest and measured 1.2-1.3x faster on SmolLM2 shapes;
      LLMKERN_INT4_PACK=1: whenever the CPU is AVX-512 (fp32 scales too: ~1.15x on small shapes, none
        on 4096 x 4096), also beside rows16 (then read by fp16 x only); =0: never.
      The kernel reads it with results identical to the canonical layout's, bit for bit.
    On AVX2 neither is made (the packed tiles measured 3-7% slower there).
    Where rows16 is packed here and no packed layout is made, the run offers `release()` (CPU_INT4_RELEASE,
    `_cpu_runner`): Int4Linear then holds rows16 alone.
    W4A8 always packs (its kernel reads only its own layout, on every ISA), and its run offers `release()` too
    (CPU_INT4_RELEASE, `_cpu_w4a8_runner`): Int4Linear then holds the W4A8 layout alone."""
    if qweight.shape[0] == 0:
        raise BackendUnsupported("N = 0")
    if mode in _W4A8:
        return _cpu_w4a8_runner(qweight, scales, offsets, bias, mode == "w4a8g", release=CPU_INT4_RELEASE)
    avx512 = _backends.cpu_isa() == "avx512_vnni"
    rows16 = os.environ.get("LLMKERN_INT4_ROWS16", "") != "0" and avx512
    covers_m1 = rows16 and _backends.cpu_has("avx512_bf16")  # rows16 takes every one-row call
    setting = os.environ.get("LLMKERN_INT4_PACK", "")
    if setting == "1" or (setting != "0" and not covers_m1):
        pack = avx512 and (setting == "1" or _scale_bytes(_backends.cpu_module(), scales.contiguous(),
                                                           offsets.contiguous()) == 2)
    else:
        pack = False
    return _cpu_runner(qweight, scales, offsets, bias, pack=pack, rows16="now" if covers_m1 else rows16,
                       release=CPU_INT4_RELEASE)


# True: a prepared W4A16 Int4Linear on an AVX-512 BF16 CPU (where rows16 takes every decode call) lets go of its
# canonical tensors once rows16 is packed and reads rows16 alone, prefill included (`_cpu_runner`'s release),
# rebuilding them on demand (state_dict, attribute reads, .to()): at G = 32 with fp16-valued scales 5 bits per
# weight held instead of 11 (6 canonical + 5). A prepared W4A8 / W4A8g Int4Linear (any CPU) does the same with
# its W4A8 layout (`_cpu_w4a8_runner`'s release). LLMKERN_INT4_KEEP_CANONICAL=1 keeps both (read at import).
CPU_INT4_RELEASE = os.environ.get("LLMKERN_INT4_KEEP_CANONICAL", "") != "1"


# 16-bit inputs with more rows than this run on tensor cores (kInt4GemvMaxM in csrc/cuda/int4_linear.cu).
_CUDA_GEMV_MAX_M = 16
# True: those inputs dequantize the weight with a CUDA kernel and multiply with cuBLAS (F.linear) instead of
# the fused dequantizing mma kernel; a packed Int4Linear dequantizes its packed copy the same way. The first GPU
# run (H200, 2026-11-29) measured the fused GEMMs at 0.17-0.33x F.linear at M >= 64; this route is timed by the
# bench entries llmkern.cuda.dequant_cublas / llmkern.cuda.module.dequant_cublas. LLMKERN_CUDA_PREFILL_CUBLAS=1
# turns it on (read at import).
CUDA_PREFILL_CUBLAS = os.environ.get("LLMKERN_CUDA_PREFILL_CUBLAS", "") == "1"
# True: 16-bit x with 2 <= M <= 16 run the decode-sized tensor-core kernel (csrc/include/llmkern/cuda/
# decode_mma.cuh) instead of the SIMT GEMV (M = 1 and fp32 x always take the GEMV).
CUDA_DECODE_MMA = True
# True: on a compute capability 9.0 GPU (H100/H200), 16-bit x with M > 16 run the sm_90a warpgroup-MMA (wgmma)
# GEMM (csrc/include/llmkern/cuda/wgmma_int4.cuh) instead of the mma.sync one. On since the first GPU run (H200,
# 2026-11-29): it passed all its tests there and was 1.4-2.0x faster than the mma.sync GEMM at every measured
# shape (Llama-3-8B layers, M = 64 and 1024; still 0.17-0.33x F.linear: docs/notes/gpu-run-2026-11-29.md).
# Applies to the op on canonical weights (Int4Linear modules run their packed kernels). LLMKERN_CUDA_INT4_WGMMA=0
# turns it off (read at import).
CUDA_INT4_WGMMA = os.environ.get("LLMKERN_CUDA_INT4_WGMMA", "") != "0"
# True: the M > 16 GEMMs (canonical mma.sync / wgmma, packed) split K over several CTAs per output tile when their
# tiles alone leave SMs without one (int4_linear_gemm_splits in csrc/cuda/int4_linear.cu: M = 64 on a 4096-wide
# layer is 32 tiles for an H200's 132 SMs), with fp32 partials summed in a fixed order by a second kernel. The
# first GPU run timed those GEMMs before split-K at 0.10-0.32x F.linear at M = 64 (one CTA on a quarter of the
# SMs); bench entries `*.no_splitk` time them without it. LLMKERN_CUDA_GEMM_SPLITK=0 turns it off (read at import).
CUDA_GEMM_SPLITK = os.environ.get("LLMKERN_CUDA_GEMM_SPLITK", "") != "0"
_SM90 = {}


def _is_sm90(device) -> bool:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    v = _SM90.get(idx)
    if v is None:
        v = _SM90[idx] = torch.cuda.get_device_capability(idx) == (9, 0)
    return v


@int4_linear_op.backend("cuda")
def _cuda(x, qweight, scales, offsets, bias, mode):
    """CUDA kernels (csrc/cuda/int4_linear.cu) on raw pointers; torch allocates output and workspace.

    fp32 x (any M) and M = 1: the W4A16 GEMV (16-byte weight loads, nibble unpack and group dequant in
    registers, fp32 accumulation), split over K when the (N, M) grid is small, with fp32 partials in a
    workspace summed in a fixed order (deterministic). 16-bit x with 2 <= M <= 16: the same weights
    dequantized in registers straight into mma.sync fragments (weights as the 16-row operand, x as the
    8-column one; CUDA_DECODE_MMA = False selects the GEMV instead). 16-bit x with M > 16: a
    bf16/fp16 mma.sync GEMM that dequantizes weight tiles into shared memory (or, with
    CUDA_PREFILL_CUBLAS, dequantize to a temporary + cuBLAS; with CUDA_INT4_WGMMA on an sm_90 GPU, the
    same dequantized tiles multiplied by Hopper warpgroup MMA), split over K when its tiles leave SMs idle
    (CUDA_GEMM_SPLITK; fp32 partials summed in a fixed order). Weights are read in the canonical layout;
    Int4Linear modules prepack them and run 16-bit x on their own kernels (`_cuda_prepare`).
    """
    mod = _backends.cuda_module()
    if x.device.type != "cuda":
        raise BackendUnsupported(f"x is on {x.device}")
    if mode != "w4a16":
        raise BackendUnsupported(f"mode {mode!r} runs on the CPU only (the CUDA kernels are W4A16)")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    G = K // scales.shape[1]  # the op's check guarantees G in GROUP_SIZES and K % G == 0
    qweight = qweight.contiguous()
    if qweight.data_ptr() % 16:
        raise BackendUnsupported("qweight is not 16-byte aligned")
    M = math.prod(x.shape[:-1])
    if M == 0 or N == 0:
        return x.new_empty(x.shape[:-1] + (N,))
    x2 = _cuda_rows(x.reshape(M, K))
    scales, offsets = scales.contiguous(), offsets.contiguous()
    stream = _backends.cuda_stream()
    tensor_cores = x.dtype != torch.float32 and M > _CUDA_GEMV_MAX_M
    if tensor_cores and CUDA_PREFILL_CUBLAS:
        wdq = torch.empty((N, K), dtype=x.dtype, device=x.device)
        mod.int4_linear_dequant(qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), G, N, K,
                                wdq.data_ptr(), _DTYPE_CODE[x.dtype], stream)
        out = torch.nn.functional.linear(x2, wdq, None if bias is None else bias.to(x.dtype))
        return out.view(x.shape[:-1] + (N,))
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    sms = _num_sms(x.device)
    splits = (1 if tensor_cores and not CUDA_GEMM_SPLITK
              else mod.int4_linear_splits(M, N, K, sms, _DTYPE_CODE[x.dtype], CUDA_DECODE_MMA))
    ws = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else None
    mod.int4_linear(
        x2.data_ptr(), _DTYPE_CODE[x.dtype], x2.stride(0) if M > 1 else K, M, K, qweight.data_ptr(), N,
        scales.data_ptr(), offsets.data_ptr(), G, 0 if bias32 is None else bias32.data_ptr(), out.data_ptr(),
        N, 0 if ws is None else ws.data_ptr(), splits, sms, CUDA_DECODE_MMA, stream,
        tensor_cores and CUDA_INT4_WGMMA and _is_sm90(x.device),
    )
    return out.view(x.shape[:-1] + (N,))  # [M, N] -> [..., N]


# True: a module's prepared CUDA call (Int4Linear on a GPU, `_cuda_prepare`) repacks the weight once into the
# tensor-core order of csrc/include/llmkern/cuda/int4_linear_packed.cuh and runs 16-bit x on the packed kernels
# (M <= 16: the decode kernel, split over K when N is small; M > 16: int4_linear_packed_gemm.cuh); fp32 x keeps
# `_cuda` on the canonical tensors. LLMKERN_CUDA_INT4_PACKED=0 turns it off (read at import).
CUDA_INT4_PACKED = os.environ.get("LLMKERN_CUDA_INT4_PACKED", "") != "0"
# True: the prepared run offers `release()` (below), with which Int4Linear drops its canonical GPU buffers once
# packed and holds the packed copy alone (DESIGN.md: "the module then holds the repacked form"), unpacking them
# on demand (`_cuda_unpack`: state_dict, fp32 x, attribute reads). LLMKERN_CUDA_INT4_KEEP_CANONICAL=1 keeps both
# (at G = 32 with fp16-valued scales: 0.75 + 0.625 bytes per weight instead of 0.625).
CUDA_INT4_RELEASE = os.environ.get("LLMKERN_CUDA_INT4_KEEP_CANONICAL", "") != "1"


def _cuda_pack(mod, qweight, scales, offsets, N, K, G, stream):
    """(qp, sp, scale16): the packed CUDA layout of a canonical weight (contiguous tensors on one GPU).
    scale16: every scale and offset is an fp16 value (GGUF Q4_0 / Q4_1 weights are), stored as one (half
    the scale bytes, same values)."""
    scale16 = bool(torch.equal(scales.to(torch.float16).to(torch.float32), scales)
                   and torch.equal(offsets.to(torch.float16).to(torch.float32), offsets))
    wbytes, sbytes = mod.int4_linear_packed_bytes(N, K, G, scale16)
    qp = torch.empty(wbytes, dtype=torch.uint8, device=qweight.device)
    sp = torch.empty(sbytes, dtype=torch.uint8, device=qweight.device)
    mod.int4_linear_pack(qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), G, N, K, qp.data_ptr(),
                         sp.data_ptr(), scale16, stream)
    return qp, sp, scale16


_UNPACK_PASS = 1 << 24  # weights per pass of _cuda_unpack (bounds its temporaries)


def _cuda_unpack(qp, sp, scale16, N, K, G):
    """The canonical (qweight uint8 [N, K // 2], scales, offsets float32 [N, K // G]) of a packed weight
    (`_cuda_pack`), bit for bit, in torch ops on qp's device (the inverse of the layout described at the top
    of int4_linear_packed.cuh). Temporaries: ~1.5 bytes per weight of at most _UNPACK_PASS weights at a time."""
    T, C, ngroups = (N + 15) // 16, K // 32, K // G
    # qp: [tile, chunk c, lane (g, t), word s] int32 words; nibble 4 r + 16 e of word s of lane (g, t) is
    # q[16 tile + g + 8 (r & 1), 32 c + 16 s + 4 t + 2 (r >> 1) + e].
    words = qp.view(torch.int32).view(T, C, 8, 4, 2)  # [T, C, g, t, s]
    qweight = torch.empty((N, K // 2), dtype=torch.uint8, device=qp.device)
    step = max(1, _UNPACK_PASS // (16 * K))  # tiles per pass
    for t0 in range(0, T, step):
        w = words[t0:t0 + step]
        n = w.shape[0]
        # q [tile, half h, g, c, s, t, j = k % 4]: row 16 tile + 8 h + g, column 32 c + 16 s + 4 t + j
        q = torch.empty((n, 2, 8, C, 2, 4, 4), dtype=torch.uint8, device=qp.device)
        for r in range(4):
            for e in range(2):
                nib = ((w >> (4 * r + 16 * e)) & 0xF).to(torch.uint8)  # [n, C, g, t, s]
                q[:, r & 1, :, :, :, :, 2 * (r >> 1) + e] = nib.permute(0, 2, 1, 4, 3)  # -> [n, g, C, s, t]
        q = q.view(n * 16, K // 2, 2)  # [rows, k / 2, k % 2]
        rows = min(N, (t0 + n) * 16) - t0 * 16  # (rows past N are the packer's zero padding)
        qweight[t0 * 16:t0 * 16 + rows] = q[:rows, :, 0] | (q[:rows, :, 1] << 4)
    # sp: [tile, group, g, (s_g, o_g, s_g+8, o_g+8)] in fp32, or fp16 values when scale16
    so = sp.view(torch.float16 if scale16 else torch.float32).view(T, ngroups, 8, 2, 2)  # [T, grp, g, h, s/o]
    so = so.permute(0, 3, 2, 1, 4).reshape(T * 16, ngroups, 2)[:N].to(torch.float32)  # [rows, grp, s/o]
    return qweight, so[..., 0].contiguous(), so[..., 1].contiguous()


def _cuda_packed_run(mod, qp, sp, scale16, N, K, G, bias32, splits, sms):
    """run(x, M) of the packed kernels for 16-bit x [..., K] with M >= 1 rows (the caller checks); `splits`
    (int4_linear_packed_splits) applies to M <= 16, the GEMM's (int4_linear_gemm_splits, CUDA_GEMM_SPLITK) to
    M > 16."""
    bias_ptr = 0 if bias32 is None else bias32.data_ptr()
    qp_ptr, sp_ptr = qp.data_ptr(), sp.data_ptr()

    def run(x, M):
        x2 = _cuda_rows(x.reshape(M, K))
        stream = _backends.cuda_stream()
        if M > _CUDA_GEMV_MAX_M and CUDA_PREFILL_CUBLAS:
            # The weight dequantized from the packed copy into a temporary [N, K] in x's dtype, then cuBLAS.
            wdq = torch.empty((N, K), dtype=x.dtype, device=x.device)
            mod.int4_linear_packed_dequant(qp_ptr, sp_ptr, scale16, G, N, K, wdq.data_ptr(), _DTYPE_CODE[x.dtype],
                                           stream)
            out = torch.nn.functional.linear(x2, wdq, None if bias32 is None else bias32.to(x.dtype))
            return out.view(x.shape[:-1] + (N,))
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        if M <= _CUDA_GEMV_MAX_M:
            sp_ = splits
        else:
            sp_ = mod.int4_linear_gemm_splits(M, N, K, sms) if CUDA_GEMM_SPLITK else 1
        ws = torch.empty((sp_, M, N), dtype=torch.float32, device=x.device) if sp_ > 1 else None
        mod.int4_linear_packed(x2.data_ptr(), _DTYPE_CODE[x.dtype], x2.stride(0) if M > 1 else K, M, K, qp_ptr,
                               sp_ptr, scale16, N, G, bias_ptr, out.data_ptr(), N,
                               0 if ws is None else ws.data_ptr(), sp_, sms, stream)
        return out.view(x.shape[:-1] + (N,))  # [M, N] -> [..., N]

    run.keep = (qp, sp, bias32)  # the tensors whose pointers it holds
    return run


@int4_linear_op.preparer("cuda")
def _cuda_prepare(qweight, scales, offsets, bias, mode):
    """The cuda preparer (Int4Linear's prepared call on a GPU): with CUDA_INT4_PACKED the weight is repacked
    once (`_cuda_pack`) and bf16 / fp16 activations run the packed tensor-core kernels (1 to 16 rows: the
    decode kernel; more: the packed GEMM); fp32 activations run `_cuda` on the canonical tensors.
    With CUDA_INT4_RELEASE the run also has `release()`: it lets go of the canonical tensors (after which it
    takes 16-bit x only) and returns `unpack()`, which rebuilds them from the packed copy (`_cuda_unpack`);
    Int4Linear calls it so that the packed copy is all the GPU holds.
    Not while a CUDA graph is being captured (the packing kernels would only run at replay): the module then
    keeps calling the op, and prepares at its next call after a buffer change."""
    if qweight.device.type != "cuda":
        raise BackendUnsupported(f"weights are on {qweight.device}")
    if mode != "w4a16":
        raise BackendUnsupported(f"mode {mode!r} runs on the CPU only (the CUDA kernels are W4A16)")
    qweight, scales, offsets = qweight.contiguous(), scales.contiguous(), offsets.contiguous()
    if qweight.data_ptr() % 16:
        raise BackendUnsupported("qweight is not 16-byte aligned")

    def canonical(x):
        return _cuda(x, qweight, scales, offsets, bias, mode)

    if not CUDA_INT4_PACKED:
        return canonical
    if torch.cuda.is_current_stream_capturing():
        raise BackendUnsupported("a CUDA graph is being captured: weights are packed outside capture")
    mod = _backends.cuda_module()
    N, K = qweight.shape[0], qweight.shape[1] * 2
    G = K // scales.shape[1]
    qp, sp, scale16 = _cuda_pack(mod, qweight, scales, offsets, N, K, G, _backends.cuda_stream())
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    # Once per weight: later calls may run on another stream, which must not start before the packing (and the
    # fp32 bias copy).
    torch.cuda.synchronize(qweight.device)
    sms = _num_sms(qweight.device)
    splits = mod.int4_linear_packed_splits(N, K, sms)
    packed = _cuda_packed_run(mod, qp, sp, scale16, N, K, G, bias32, splits, sms)
    fp32 = [canonical]  # dropped by release(): then nothing here refers to the canonical tensors

    def run(x):
        M = math.prod(x.shape[:-1])
        if M == 0:
            return x.new_empty(x.shape[:-1] + (N,))
        if x.dtype == torch.float32:
            if fp32[0] is None:
                raise RuntimeError("int4_linear: this prepared run released its canonical weights and takes "
                                   "bf16 / fp16 x only (Int4Linear restores them before an fp32 call)")
            return fp32[0](x)
        return packed(x, M)

    def release():
        fp32[0] = None
        return functools.partial(_cuda_unpack, qp, sp, scale16, N, K, G)

    run.packed = (qp, sp, scale16)  # (for tests and memory accounting)
    release.dtypes = (torch.float16, torch.bfloat16)  # (fp32 x runs the canonical kernels)
    if CUDA_INT4_RELEASE:
        run.release = release
    return run


def int4_linear(x, qweight, scales, offsets, bias=None, mode="w4a16", backend=None):
    """y[..., N] = x[..., K] @ dequant(qweight)^T + bias, in x's dtype; group size G = K / scales.shape[1].
    mode "w4a16" (float activations), "w4a8" / "w4a8g" (x quantized to int8 first, one scale per row / per
    group of G; see the module doc)."""
    return int4_linear_op(x, qweight, scales, offsets, bias, mode, backend)
