"""int4_linear's CPU runners and layouts (csrc/cpu/int4_linear.cpp, int4_linear_w4a8.cpp): the weights bound once in
C++ (`_cpu_runner`, `_cpu_w4a8_runner`), the packed layouts (packed lane = k, rows16, W4A8) and the rows16 release
with its unpacker. ops/int4_linear.py registers the CPU backend and preparer that use them."""
from __future__ import annotations

import functools
import os
import threading

import torch

from .. import _backends
from . import _unpack
from ._cpu_linear import BoundRun, packed_buffer
from ._registry import BackendUnsupported


@functools.lru_cache(maxsize=None)
def _rows16_limits() -> dict:
    """Rows per call whose first occurrence packs a lazy rows16 layout, by x dtype: fp32 1..decode_max_rows_f32,
    bf16 1..decode_max_rows with AVX-512 BF16 dot products. (Once packed, the kernel also reads it for fp16 x and
    bf16 x without dot products, converted to fp32 rows, and for the prefill: csrc/include/llmkern/cpu/
    int4_linear.h's dispatch.)"""
    info = _backends.cpu_module().int4_linear_cpu_info()
    bf16 = info["decode_max_rows"] if info["bf16_dot"] and _backends.cpu_has("avx512_bf16") else 0
    return {torch.float32: info["decode_max_rows_f32"], torch.bfloat16: bf16}


def _cpu_runner(qweight, scales, offsets, bias, pack=True, rows16=False, release=False):
    """run(x) of the C++ kernel (csrc/cpu/int4_linear.cpp) with these weights bound once (a `BoundRun`).

    Everything that depends only on the weights (contiguity, raw pointers, the fp32 bias, G) is done
    here and bound in C++ (`int4_linear_bind`); run(x) allocates the output, reuses the per-thread
    workspace and launches. The runner keeps the tensors whose pointers it holds alive.

    pack (the preparer, i.e. Int4Linear's prepared call): the weights are also repacked once into
    the kernel's packed decode layout (`_cpu_pack`), which one-row calls (M = 1) stream instead of
    the canonical tensors (with 2-4 rows it measured slower); the prefill path keeps reading the canonical tensors, which the caller
    holds anyway (a module's buffers). Results are bit-identical to the canonical kernel's. Memory:
    the packed copy adds K/2 + 2 (K/G) E bytes per output row (E = 2 when every scale and offset is
    an fp16 value, else 4) on top of the canonical K/2 + 8 K/G.

    rows16 (the preparer, on AVX-512 CPUs): the weights are also packed into the rows16 layout
    (`_cpu_pack_rows16`, csrc/include/llmkern/cpu/int4_linear_rows16.h: one output row per vector lane),
    which calls of 1 to 16 bf16 rows (with AVX-512 BF16) or 1 to 8 rows of other x (fp32; fp16 and bf16
    without the dot products converted to fp32 first) read instead of the packed layout
    (docs/notes/cpu-int4-decode-compute.md); same bytes per row as the packed layout.
    rows16=True packs it at the first call that reads it (run or call), so a model that never decodes
    never pays its time or memory; rows16="now" packs it here (the preparer, where it replaces the
    packed layout: a model's first decode step then does not pay ~50 ms of packing). Its sums run in
    another order: those calls equal the canonical kernel's to fp32 rounding, not bitwise (but a row's
    result does not depend on the other rows of the call). Once packed, the prefill reads rows16 too
    (int4_linear_rows16_panel.h: the same panels, so the same bits as from the canonical tensors).

    release (with rows16="now" and no packed layout; `_cpu_prepare` on AVX-512 BF16 CPUs): the run also has
    `release()`, which rebinds it to rows16 alone (every call, any x dtype and row count, then reads rows16:
    decode sizes on the rows16 decode, more rows on the prefill path) and lets go of the canonical
    tensors; it returns `unpack()`, which rebuilds them from rows16, bit for bit (`_cpu_unpack_rows16`).
    Int4Linear calls it, so that rows16 is all the module holds (`release.dtypes`: the x dtypes the released
    run takes, here every float).
    """
    mod = _backends.cpu_module()
    if qweight.device.type != "cpu":
        raise BackendUnsupported(f"weights are on {qweight.device}")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    G = K // scales.shape[1]  # the op's check guarantees G in GROUP_SIZES and K % G == 0
    qweight, scales, offsets = qweight.contiguous(), scales.contiguous(), offsets.contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    packed, pk = (None, (0, 0)) if not pack else _cpu_pack(mod, qweight, scales, offsets, N, K, G)
    bias_ptr = 0 if bias32 is None else bias32.data_ptr()

    def bind(r16=(0, 0)):
        """The BoundLinear of these weights, with the rows16 layout's (pointer, E) once packed."""
        return mod.int4_linear_bind(qweight.data_ptr(), N, K, scales.data_ptr(), offsets.data_ptr(), G, bias_ptr,
                                    -1, True, *pk, *r16)

    run = BoundRun(bind(), K, N, (qweight, scales, offsets, bias32, packed), packed=packed, packed_e=pk[1])
    if not rows16:
        return run
    limits16 = _rows16_limits()
    lock = threading.Lock()

    def pack16():
        """Packs the rows16 layout (once, under the lock: two threads must not swap a buffer in use)."""
        with lock:
            if run.lazy is not None:
                buf, view, r16 = _cpu_pack_rows16(mod, qweight, scales, offsets, N, K, G)
                run.keep += (buf,)
                run.rows16, run.rows16_e = view, r16[1]
                run.bound = bind(r16)
                run.lazy = None

    def lazy(M, dtype):
        if 1 <= M <= limits16.get(dtype, 0):
            pack16()

    run.lazy = lazy
    if rows16 == "now":
        pack16()
    if not (release and rows16 == "now" and packed is None):
        return run

    def release_fn():
        nonlocal qweight, scales, offsets, bind  # (the closures above hold them too: cleared here)
        view, e = run.rows16, run.rows16_e
        run.bound = mod.int4_linear_bind(0, N, K, 0, 0, G, bias_ptr, -1, True, 0, 0, view.data_ptr(), e)
        run.keep = (bias32,) + run.keep[5:]  # (keep was (qweight, scales, offsets, bias32, packed) + rows16's buffer)
        qweight = scales = offsets = bind = None
        run.release = None  # (once)
        return functools.partial(_cpu_unpack_rows16, view, e, N, K, G)

    release_fn.dtypes = (torch.float32, torch.bfloat16, torch.float16)
    run.release = release_fn
    return run


def _cpu_unpack_rows16(view, e, N, K, G):
    """(qweight uint8 [N, K // 2], scales, offsets float32 [N, K // G]): the canonical tensors a rows16 layout
    (`_cpu_pack_rows16`) was packed from, bit for bit (through a torch op, which torch.compile can trace:
    ops/_unpack.py)."""
    return _unpack.int4_rows16_unpack(view, e, N, K, G)


def _scale_bytes(mod, scales, offsets):
    """2 when every scale and offset (contiguous fp32) is exactly an fp16 value (GGUF Q4_0/Q4_1 imports:
    their d and m are fp16), so the packed layouts can store them as fp16 losslessly; else 4."""
    n = scales.numel()
    return 2 if mod.int4_linear_fits_f16(scales.data_ptr(), n) and mod.int4_linear_fits_f16(offsets.data_ptr(), n) else 4


def _cpu_pack(mod, qweight, scales, offsets, N, K, G):
    """(packed uint8 tensor, (pointer, E)): the kernel's packed decode layout of canonical weights,
    with fp16 scales and offsets (E = 2) when every one of them is exactly an fp16 value (GGUF
    Q4_0/Q4_1 imports: their d and m are fp16), else fp32 (E = 4)."""
    E = _scale_bytes(mod, scales, offsets)
    nbytes = mod.int4_linear_packed_size(N, K, G, E)
    packed = packed_buffer(max(nbytes, 1))
    mod.int4_linear_pack(qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), N, K, G, E,
                         packed.data_ptr(), nbytes)
    return packed, (packed.data_ptr(), E)


def _cpu_pack_rows16(mod, qweight, scales, offsets, N, K, G):
    """(uint8 buffer, its view holding the layout, (pointer, E)): the rows16 layout of canonical weights at
    a 64-byte boundary: factored (E = 1: per row and 8 groups an fp32 factor, per group one-byte codes;
    GGUF Q4_K imports) when every scale and offset factors exactly, else fp16 (E = 2) when every one is an
    fp16 value (GGUF Q4_0 / Q4_1 imports), else fp32. At G = 32 that is 4.75, 5 and 6 bits per weight;
    outputs are the same bits either way (csrc/include/llmkern/cpu/int4_linear_rows16.h).
    LLMKERN_INT4_FACTORED=0: never E = 1."""
    if ((K // G) % 8 == 0 and os.environ.get("LLMKERN_INT4_FACTORED", "") != "0"
            and mod.int4_linear_rows16_factors_ok(scales.data_ptr(), offsets.data_ptr(), N, K, G)):
        E = 1
    else:
        E = _scale_bytes(mod, scales, offsets)
    nbytes = mod.int4_linear_rows16_packed_size(N, K, G, E)
    buf, packed = _aligned_bytes(nbytes)
    mod.int4_linear_rows16_pack(qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), N, K, G, E,
                                packed.data_ptr(), nbytes)
    return buf, packed, (packed.data_ptr(), E)


def _aligned_bytes(nbytes):
    """(buffer, view): `packed_buffer(nbytes)` twice (the view keeps its memory alive; callers hold both)."""
    view = packed_buffer(nbytes)
    return view, view


def _cpu_w4a8_runner(qweight, scales, offsets, bias, group_scales=False, release=False):
    """run(x) of the W4A8 kernel (csrc/cpu/int4_linear_w4a8.cpp) with these weights packed once into its
    layout (int4_linear_w4a8_common.h: 16-row blocks, per group 8 G bytes of nibbles in vpdpbusd order,
    then the 16 scales and offsets, fp16 when every one of them is an fp16 value, else fp32). The
    packed copy is K/2 + 2 E K/G bytes per output row (rows padded to 16); the canonical tensors are
    not read by the kernel. group_scales: activation scales per group ("w4a8g"), else per row ("w4a8").
    A `BoundRun`, as `_cpu_runner`'s.

    release (the preparer, CPU_INT4_RELEASE): the run also has `release()`, which returns `unpack()`, the
    canonical tensors rebuilt from the layout bit for bit (`_unpack.int4_w4a8_unpack`); the run holds no
    reference to them, so Int4Linear, which calls it, holds the W4A8 layout alone (at G = 32 with fp16-valued
    scales 5 bits per weight instead of 11). Every ISA: the layout is the same for all of them."""
    mod = _backends.cpu_module()
    if qweight.device.type != "cpu":
        raise BackendUnsupported(f"weights are on {qweight.device}")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    G = K // scales.shape[1]
    qweight, scales, offsets = qweight.contiguous(), scales.contiguous(), offsets.contiguous()
    E = _scale_bytes(mod, scales, offsets)
    nbytes = mod.int4_linear_w4a8_packed_size(N, K, G, E)
    buf, packed = _aligned_bytes(nbytes)
    mod.int4_linear_w4a8_pack(qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), N, K, G, E,
                              packed.data_ptr(), nbytes)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    bound = mod.int4_linear_w4a8_bind(packed.data_ptr(), N, K, G, E, 0 if bias32 is None else bias32.data_ptr(),
                                      group_scales)
    run = BoundRun(bound, K, N, (buf, bias32), packed=packed, packed_e=E)
    if release:
        def release_fn():
            run.release = None  # (once)
            return functools.partial(_unpack.int4_w4a8_unpack, packed, E, N, K, G)

        release_fn.dtypes = (torch.float32, torch.bfloat16, torch.float16)
        run.release = release_fn
    return run
