"""`int8_linear`: y = x @ dequant(w)^T (+ bias), int8 weights with per-channel or per-group scales.

Modes (DESIGN.md):
- "w8a16": weight-only; x stays float, weights are dequantized (w * scale) on the fly.
- "w8a8": x is quantized per row exactly as `quantize_rows_int8` does (symmetric int8, dynamic:
  scale_x = max|x_row| / 127, q = round_half_even(x * (127 / max|x_row|))), int8 x int8
  products are summed in int32 per weight group, then rescaled by scale_x * weight scale.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .. import _backends
from .. import reference
from . import _checks as C, _unpack
from ._cpu_linear import DTYPE_CODE as _DTYPE_CODE, BoundRun, packed_buffer
from ._registry import _PLAIN, BackendUnsupported, defop, needs_grad

MODES = ("w8a16", "w8a8")
# 127 * 127 * group must stay below 2^31 for the C++ kernel's int32 group sums.
_MAX_W8A8_GROUP = 131072


_FLOATS = C.FLOAT_SET


def _cpu_fast_ok(x, weight, weight_scale, bias, mode) -> bool:
    """Everything _check verifies, in one pass, for plain CPU tensors that autograd does not track (the
    weights may be nn.Parameters): ~1 us instead of ~3 (the op's `fast_check`, see defop). False:
    _check's own code runs, with its messages."""
    P = _PLAIN
    if not (type(x) in P and type(weight) in P and type(weight_scale) in P and x.is_cpu and weight.is_cpu
            and weight_scale.is_cpu):
        return False
    if not (x.dtype in _FLOATS and weight.dtype == torch.int8 and weight_scale.dtype == torch.float32
            and weight.dim() == 2 and x.dim() >= 1):
        return False
    N, K = weight.shape
    ss = weight_scale.shape
    if x.shape[-1] != K or not (ss == (N,) or (len(ss) == 2 and ss[0] == N and ss[1] > 0 and K % ss[1] == 0)):
        return False
    if bias is not None and not (type(bias) in P and bias.is_cpu and bias.dtype in _FLOATS and bias.shape == (N,)):
        return False
    return mode in MODES and not needs_grad(x, weight, weight_scale, bias)


def _check(x, weight, weight_scale, bias, mode):
    op = "int8_linear"
    if _cpu_fast_ok(x, weight, weight_scale, bias, mode):
        return
    C.tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"llmkern.{op}: x must have rank >= 1 ([..., K]), got shape {tuple(x.shape)}")
    C.tensor(op, "weight", weight, ranks=(2,), dtypes=(torch.int8,))
    C.tensor(op, "weight_scale", weight_scale, ranks=(1, 2), dtypes=(torch.float32,))
    N, K = weight.shape
    C.shape(op, "x", x, tuple([None] * (x.dim() - 1)) + (K,), "last dim must be weight's K")
    if weight_scale.dim() == 1:
        C.shape(op, "weight_scale", weight_scale, (N,), "per output channel")
    else:
        C.shape(op, "weight_scale", weight_scale, (N, None), "[N, K // group_size]")
        groups = weight_scale.shape[1]
        if groups == 0 or K % groups != 0:
            raise ValueError(
                f"llmkern.{op}: weight_scale has {groups} groups per row, which does not divide K={K}"
            )
    if bias is not None:
        C.tensor(op, "bias", bias, ranks=(1,), dtypes=C.FLOAT_DTYPES)
        C.shape(op, "bias", bias, (N,))
    if mode not in MODES:
        raise ValueError(f"llmkern.{op}: mode must be one of {MODES}, got {mode!r}")
    C.same_device(op, x=x, weight=weight, weight_scale=weight_scale, bias=bias)


def _fake(x, weight, weight_scale, bias, mode):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


int8_linear_op = defop(
    "int8_linear",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None, str mode=\"w8a16\", "
    "str? backend=None) -> Tensor",
    check=_check,
    fake=_fake,
    fast_check=_cpu_fast_ok,
)


@int8_linear_op.backend("reference")
def _reference(x, weight, weight_scale, bias, mode):
    return reference.int8_linear(x, weight, weight_scale, bias, mode)


def _cpu_runner(weight, weight_scale, bias, mode, pack=False, gemm=False, release=False):
    """run(x) of the C++ kernel (csrc/cpu/int8_linear.cpp) with these weights bound once (a `BoundRun`).

    Everything that depends only on the weights (contiguity, raw pointers, the fp32 bias, the group)
    is done here and bound in C++ (`int8_linear_bind`); run(x) allocates the output, reuses the per-thread
    workspace and launches. The runner keeps the tensors whose pointers it holds alive.

    pack (the preparer, i.e. Int8Linear's prepared call, decides): the weights are also repacked once
    into the kernel's packed decode layout for this mode (`_cpu_pack`, csrc/include/llmkern/cpu/
    int8_linear_pack*.h), which decode calls (M <= 8 rows; 4: W8A8 per channel, and AVX2 W8A16 per
    channel or G >= 128) on AVX-512 and AVX2 stream instead of the canonical tensors; other calls keep
    reading the canonical tensors, which the caller holds anyway (a module's buffers). Results are bit-identical to the canonical kernel's. Memory: the packed copy
    is about as large as the canonical tensors (K + E K/G bytes per row, E = 2 when every scale is an
    fp16 value, else 4; rows padded to a multiple of 8, K to a multiple of 64).

    gemm (W8A8 only; the preparer decides): the weights are also packed into the W8A8 GEMM layout
    (`_cpu_pack_gemm`, csrc/include/llmkern/cpu/int8_linear_gemm.h), which W8A8 calls on AVX-512 of at
    least 2 rows read with VNNI GEMM micro-kernels
    (docs/notes/cpu-w8a8-gemm.md). Per channel the results are bit-identical to the canonical kernel's;
    per group equal up to fp32 rounding. Memory: about the canonical weight bytes again (K rounded up to
    a multiple of 4, N to 16, plus 8 bytes per channel and group).

    release (W8A16 with the packed layout, W8A8 with the packed and the GEMM layouts; `_cpu_prepare` decides,
    CPU_INT8_RELEASE): the run also has `release()`, which rebinds it to those layouts and the scales alone and
    lets go of the int8 weight tensor. Every call then reads them: decode calls the packed kernels as before;
    W8A16 calls of more rows the GEMM routes over panels built from the packed layout (the same values, so the
    same bits), W8A8 ones the GEMM layout as before; calls the canonical tiles took run the packed kernels a few
    rows at a time (each ISA's packed kernels give its tiles' bits). It returns `unpack()`, which rebuilds the
    tensor bit for bit from the packed layout. Int8Linear calls it, so that the layouts and the scales are all it
    holds (`release.dtypes`: the x dtypes the released run takes, here every float).
    """
    mod = _backends.cpu_module()
    if weight.device.type != "cpu":
        raise BackendUnsupported(f"weight is on {weight.device}")
    N, K = weight.shape
    group = K if weight_scale.dim() == 1 else K // max(weight_scale.shape[1], 1)
    if K == 0:
        raise BackendUnsupported("K == 0")
    if mode == "w8a8" and group > _MAX_W8A8_GROUP:
        raise BackendUnsupported(f"w8a8 group of {group} > {_MAX_W8A8_GROUP} could overflow int32 sums")
    weight, weight_scale = weight.contiguous(), weight_scale.contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    packed, pk = (None, (0, 0)) if not pack else _cpu_pack(mod, weight, weight_scale, N, K, group, mode)
    gemm_packed = None
    if gemm:
        if mode != "w8a8" or not _can_gemm(K, group):
            raise ValueError(f"llmkern.int8_linear: the GEMM layout takes mode 'w8a8' with a group of K or a multiple "
                             f"of 4, got mode {mode!r} and group {group}")
        gemm_packed = _cpu_pack_gemm(mod, weight, weight_scale, N, K, group)
    bound = mod.int8_linear_bind(weight.data_ptr(), N, K, weight_scale.data_ptr(), group,
                                 0 if bias32 is None else bias32.data_ptr(), mode, *pk,
                                 0 if gemm_packed is None else gemm_packed.data_ptr())
    # keep: the tensors behind the bound pointers
    run = BoundRun(bound, K, N, (weight, weight_scale, bias32, packed, gemm_packed), packed=packed, packed_e=pk[1],
                   gemm_packed=gemm_packed)
    if not (release and packed is not None and (mode == "w8a16" or gemm_packed is not None)):
        return run
    bias_ptr = 0 if bias32 is None else bias32.data_ptr()

    def release_fn():
        nonlocal weight  # (dropped here: nothing in the run refers to it afterwards)
        run.bound = mod.int8_linear_bind(0, N, K, weight_scale.data_ptr(), group, bias_ptr, mode, *pk,
                                         0 if gemm_packed is None else gemm_packed.data_ptr())
        run.keep = (weight_scale, bias32, packed, gemm_packed)
        weight = None
        run.release = None  # (once)
        unpack = functools.partial(_cpu_unpack, packed, N, K)
        unpack.packed = packed  # (what a tied embedding reads its rows from: nn/embedding.py)
        return unpack

    release_fn.dtypes = (torch.float32, torch.bfloat16, torch.float16)
    run.release = release_fn
    return run


def _cpu_unpack(packed, N, K):
    """(weight int8 [N, K],): the canonical weight tensor the packed decode layout (`_cpu_pack`) was packed
    from, bit for bit (through a torch op, which torch.compile can trace: ops/_unpack.py)."""
    return (_unpack.int8_unpack(packed, N, K),)


# W8A16 decode calls (1-8 rows) without a packed copy read the canonical tensors with the "stream" kernels
# (csrc/include/llmkern/cpu/int8_linear_stream.h). From this K on they are about as fast as the packed copy
# (cold, 2 threads, M = 1: AVX-512 0.91-1.25x, AVX2 0.84-0.94x at K = 2048-14336; AVX-512 0.74-1.18x at
# K = 576 / 1536, where the copy is small; docs/notes/cpu-memory.md), so the preparer does not pack: the
# module holds its int8 weights once.
# (kStreamMinK there.)
_STREAM_MIN_K = 2048


def _streams(K, group):
    """Whether the preparer leaves W8A16 decode of this shape to the stream kernels (no packed copy): long rows
    with any group the packed layout takes (per channel, 16, 32, multiples of 64)."""
    return K >= _STREAM_MIN_K and _can_pack(K, group)


def _can_pack(K, group):
    """Whether the packed decode layout takes this group: per channel, 16, 32 or a multiple of 64."""
    return group == K or group in (16, 32) or group % 64 == 0


def _can_gemm(K, group):
    """Whether the W8A8 GEMM layout takes this group: per channel, or a multiple of 4 (whole 4-byte steps)."""
    return group == K or group % 4 == 0


def _cpu_pack_gemm(mod, weight, weight_scale, N, K, group):
    """The W8A8 GEMM layout (uint8 tensor) of canonical weights: 64-channel panels of [K/4][64][4] bytes,
    then per group the channels' 128 x weight sums (int32) and scales (fp32)."""
    nbytes = mod.int8_linear_gemm_packed_size(N, K, group)
    packed = packed_buffer(nbytes)
    mod.int8_linear_gemm_pack(weight.data_ptr(), weight_scale.data_ptr(), N, K, group, packed.data_ptr(), nbytes)
    return packed


def _cpu_pack(mod, weight, weight_scale, N, K, group, mode):
    """(packed uint8 tensor, (pointer, E)): the kernel's packed decode layout of canonical weights for
    `mode`, with fp16 scales (E = 2) when every scale is exactly an fp16 value (GGUF Q8_0 imports:
    their d is fp16), else fp32 (E = 4)."""
    E = 2 if mod.int8_linear_fits_f16(weight_scale.data_ptr(), weight_scale.numel()) else 4
    nbytes = mod.int8_linear_packed_size(N, K, group, E)
    packed = packed_buffer(nbytes)
    mod.int8_linear_pack(weight.data_ptr(), weight_scale.data_ptr(), N, K, group, E, mode, packed.data_ptr(), nbytes)
    return packed, (packed.data_ptr(), E)


@int8_linear_op.backend("cpu")
def _cpu(x, weight, weight_scale, bias, mode):
    """Launch the C++ kernel on raw pointers (canonical layout: nothing repacked per call)."""
    if not x.is_cpu:  # (is_cpu: no torch.device object built, ~0.2 us)
        raise BackendUnsupported(f"x is on {x.device}")
    if weight.shape[0] == 0:  # (an empty weight has no data pointer to bind: the reference returns [..., 0])
        raise BackendUnsupported("N = 0")
    return _cpu_runner(weight, weight_scale, bias, mode)(x)


@int8_linear_op.preparer("cpu")
def _cpu_prepare(weight, weight_scale, bias, mode):
    """The cpu preparer (Int8Linear's prepared call). On AVX-512 and AVX2 CPUs it also packs the weights
    for decode calls of up to 8 rows (AVX2 W8A16 per channel or G >= 128: 4) (`_cpu_runner`; AVX-512 1.4-10x faster at 1 thread,
    docs/notes/cpu-int8pack.md; AVX2 1.3-3.4x cold, docs/notes/cpu-avx2-int8pack.md), when the group is
    packable (per channel, 16, 32, multiple of 64): LLMKERN_INT8_PACK unset: pack (fp16 scales when exact, else fp32),
    except W8A16 weights with K >= 2048 on AVX-512, whose decode the stream kernels run from the canonical
    tensors about as fast (`_streams`: the weights held once, not twice; on AVX2, where they run at 0.85-0.94x,
    those are packed and the weight released, unless CPU_INT8_RELEASE is off); 1: pack those too; 0: never (no
    memory beyond the canonical tensors). The kernel reads whichever layout it is given, with identical results. A W8A16 run with
    the packed layout, and a W8A8 run with both layouts (below), offers `release()` (CPU_INT8_RELEASE), with
    which Int8Linear lets go of its int8 weight.

    W8A8 on AVX-512 also packs the GEMM layout (`_cpu_runner` gemm) when the group is K or a multiple
    of 4: calls of 2 rows or more read it instead of the decode layout / canonical tiles (1.3-1.4x at
    M = 2, 1.5-3x for prefill at 1 thread, docs/notes/cpu-w8a8-gemm.md), one-row calls keep the decode
    layout. LLMKERN_INT8_GEMM unset or 1: pack; 0: never (no memory beyond the other layouts)."""
    N, K = weight.shape
    if N == 0:
        raise BackendUnsupported("N = 0")
    group = K if weight_scale.dim() == 1 else K // max(weight_scale.shape[1], 1)
    isa = _backends.cpu_isa() if K > 0 and N > 0 else "scalar"
    avx512 = isa == "avx512_vnni"
    env = os.environ.get("LLMKERN_INT8_PACK", "")
    pack = env != "0" and isa in ("avx512_vnni", "avx2") and _can_pack(K, group)
    if pack and env != "1" and mode == "w8a16" and _streams(K, group) and (avx512 or not CPU_INT8_RELEASE):
        # decode streams the canonical tensors, about as fast on AVX-512: no second copy of the weights. (On AVX2
        # the stream kernels run at 0.85-0.94x the packed copy, and the copy replaces the weight once released.)
        pack = False
    gemm = (os.environ.get("LLMKERN_INT8_GEMM", "") != "0" and avx512 and mode == "w8a8" and _can_gemm(K, group)
            and group <= _MAX_W8A8_GROUP)
    return _cpu_runner(weight, weight_scale, bias, mode, pack=pack, gemm=gemm, release=CPU_INT8_RELEASE)


# True: a prepared W8A16 Int8Linear with the packed decode layout (AVX-512 or AVX2, K < 2048 or LLMKERN_INT8_PACK=1)
# lets go of its int8 weight tensor and reads the packed layout alone, prefill included (`_cpu_runner`'s
# release), rebuilding the tensor on demand (state_dict, attribute reads, .to()): the weights held once, not
# twice. A W8A8 one with the packed and the GEMM layouts (AVX-512) reads those alone: twice, not three times.
# LLMKERN_INT8_KEEP_CANONICAL=1 keeps the tensor (read at import).
CPU_INT8_RELEASE = os.environ.get("LLMKERN_INT8_KEEP_CANONICAL", "") != "1"


# 16-bit W8A16 inputs with more rows than this run on tensor cores (csrc/cuda: _CUDA_GEMV_MAX_M must match
# kInt8GemvMaxM / kInt4GemvMaxM there).
_CUDA_GEMV_MAX_M = 16
# True: those inputs dequantize the weight with a CUDA kernel and multiply with cuBLAS (F.linear) instead of
# the fused dequantizing mma kernel (a fallback switch kept for the first GPU runs; tests cover both).
CUDA_PREFILL_CUBLAS = False
# True: W8A16 with 16-bit x and 2 <= M <= 16 runs the decode-sized tensor-core kernel (csrc/include/
# llmkern/cuda/decode_mma.cuh) instead of the SIMT GEMV (M = 1 and fp32 x always take the GEMV).
CUDA_DECODE_MMA = True
# True: W8A8 with M > 16 runs the int8 tensor-core GEMM; False: the dp4a GEMV in blocks of 8 rows (slow).
CUDA_W8A8_MMA = True
# True (LLMKERN_CUDA_INT8_WGMMA=1, read at import): per-channel W8A8 with M > 16 on a compute-capability-9.0
# GPU runs the sm_90a GEMM (TMA + wgmma m64n256k32; csrc/include/llmkern/cuda/int8_linear_sm90.cuh) instead
# of the mma.sync one. Off until a GPU run has checked it (docs/notes/cuda-int8-sm90.md).
CUDA_W8A8_WGMMA = os.environ.get("LLMKERN_CUDA_INT8_WGMMA", "") == "1"
# The CUDA kernel path of the last call (the launcher's name for it: "w8a8_wgmma", "w8a8_mma_128x128", ...).
_last_cuda_path = None


@int8_linear_op.backend("cuda")
def _cuda(x, weight, weight_scale, bias, mode):
    """CUDA kernels (csrc/cuda/int8_linear.cu) on raw pointers; torch allocates output and workspaces.

    W8A8: per-row quantization kernel into xq int8 [M, K] / xs fp32 [M], then a dp4a GEMV (M <= 16) or
    the mma.sync int8 tensor-core GEMM (CUDA_W8A8_MMA), or with per-channel scales and CUDA_W8A8_WGMMA on a
    compute-capability-9.0 GPU the sm_90a TMA + wgmma GEMM (same bits). W8A16: fp32-math GEMV for fp32 x (any M) and
    M = 1; 16-bit x with 2 <= M <= 16: weights dequantized in registers into mma.sync fragments (swap AB,
    CUDA_DECODE_MMA); 16-bit x with M > 16: a bf16/fp16 mma.sync GEMM that dequantizes weight tiles into
    shared memory (or, with CUDA_PREFILL_CUBLAS, dequantize to a temporary + cuBLAS). Weights are read in
    the canonical layout (no prepacking yet).
    """
    if x.device.type != "cuda":
        raise BackendUnsupported(f"x is on {x.device}")
    return _cuda_bind(weight, weight_scale, bias, mode)(x)


def _cuda_bind(weight, weight_scale, bias, mode):
    """run(x) of `_cuda` with everything that depends only on the weights done once (contiguity, alignment,
    group, the fp32 bias, pointers): the op binds per call, Int8Linear's prepared call once
    (`_cuda_prepare`). Raises BackendUnsupported for weights the kernels cannot take."""
    mod = _backends.cuda_module()
    N, K = weight.shape
    group = K if weight_scale.dim() == 1 else K // weight_scale.shape[1]
    if K == 0 or K % 16:
        raise BackendUnsupported(f"K={K} is not a positive multiple of 16")
    if group % 16:
        raise BackendUnsupported(f"weight group of {group} is not a multiple of 16")
    if mode == "w8a8" and group > _MAX_W8A8_GROUP:
        raise BackendUnsupported(f"w8a8 group of {group} > {_MAX_W8A8_GROUP} could overflow int32 sums")
    weight = weight.contiguous()
    if weight.data_ptr() % 16:
        raise BackendUnsupported("weight is not 16-byte aligned")
    weight_scale = weight_scale.contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    w_ptr, s_ptr, b_ptr = weight.data_ptr(), weight_scale.data_ptr(), 0 if bias32 is None else bias32.data_ptr()

    def run(x):
        M = math.prod(x.shape[:-1])
        if M == 0 or N == 0:
            return x.new_empty(x.shape[:-1] + (N,))
        x2 = _cuda_rows(x.reshape(M, K))
        stream = _backends.cuda_stream()
        if CUDA_PREFILL_CUBLAS and mode == "w8a16" and x.dtype != torch.float32 and M > _CUDA_GEMV_MAX_M:
            wdq = torch.empty((N, K), dtype=x.dtype, device=x.device)
            mod.int8_linear_dequant(w_ptr, s_ptr, group, N, K, wdq.data_ptr(), _DTYPE_CODE[x.dtype], stream)
            out = torch.nn.functional.linear(x2, wdq, None if bias is None else bias.to(x.dtype))
            return out.view(x.shape[:-1] + (N,))
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        xq = xs = None
        if mode == "w8a8":
            xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
            xs = torch.empty((M,), dtype=torch.float32, device=x.device)
        global _last_cuda_path
        _last_cuda_path = mod.int8_linear(
            x2.data_ptr(), _DTYPE_CODE[x.dtype], x2.stride(0) if M > 1 else K, M, K, w_ptr, N, s_ptr, group,
            b_ptr, out.data_ptr(), N, mode, 0 if xq is None else xq.data_ptr(), 0 if xs is None else xs.data_ptr(),
            _num_sms(x.device), CUDA_DECODE_MMA, CUDA_W8A8_MMA, stream, CUDA_W8A8_WGMMA,
        )
        return out.view(x.shape[:-1] + (N,))  # [M, N] -> [..., N]

    run.keep = (weight, weight_scale, bias32)  # the tensors whose pointers it holds
    return run


@int8_linear_op.preparer("cuda")
def _cuda_prepare(weight, weight_scale, bias, mode):
    """The cuda preparer (Int8Linear's prepared call on a GPU): the weights bound once (`_cuda_bind`), so a
    call does only the activation's work (no per-call fp32 copy of a 16-bit bias, no re-checks). Nothing is
    repacked: the kernels read the canonical layout."""
    if weight.device.type != "cuda":
        raise BackendUnsupported(f"weights are on {weight.device}")
    if torch.cuda.is_current_stream_capturing():  # (its copies, e.g. the fp32 bias, would only be made at replay)
        raise BackendUnsupported("a CUDA graph is being captured: weights are bound outside capture")
    run = _cuda_bind(weight, weight_scale, bias, mode)
    # Once per weight: the copies the binding made (contiguous weight, fp32 bias) are written on this stream;
    # later calls may run on another.
    torch.cuda.synchronize(weight.device)
    return run


def _cuda_rows(x2):
    """x2 [M, K] with unit column stride and 16-byte aligned rows (a view when it already is, else a copy)."""
    es = x2.element_size()
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and (x2.stride(0) * es) % 16) or x2.data_ptr() % 16:
        x2 = x2.contiguous()
        if x2.data_ptr() % 16:  # already contiguous but at a misaligned offset
            x2 = x2.clone()
    return x2


_SMS: dict = {}


def _num_sms(device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SMS.get(idx)
    if n is None:
        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


@int8_linear_op.backend("triton")
def _triton(x, weight, weight_scale, bias, mode):
    """Triton W8A8/W8A16 kernels on CUDA tensors (llmkern.triton_kernels imported lazily: it needs triton)."""
    from ..triton_kernels import int8_linear as tk

    if x.device.type != "cuda":
        raise BackendUnsupported(f"triton runs on CUDA tensors, x is on {x.device}")
    try:
        return tk.int8_linear(x, weight, weight_scale, bias, mode)
    except tk.Unsupported as e:
        raise BackendUnsupported(str(e)) from None


def int8_linear(x, weight, weight_scale, bias=None, mode="w8a16", backend=None):
    """y[..., N] = x[..., K] @ dequant(weight[N, K])^T + bias[N], in x's dtype.

    weight_scale: float32 [N] (per channel) or [N, K // G] (per group of G along K; GGUF Q8_0 has G=32).
    mode: "w8a16" (weight-only) or "w8a8" (dynamic per-row int8 activations, int32 accumulation).
    """
    return int8_linear_op(x, weight, weight_scale, bias, mode, backend)
