"""CPU model of csrc/include/llmkern/cuda/wgmma_int4.cuh (the sm_90a warpgroup-MMA int4 GEMM): no GPU needed.

It mirrors the kernel's index formulas line by line (keep the two in step) and plays them against a model of
the hardware written from the PTX ISA (not from the kernel):
  - shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4,
    16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base offset,
    62-63 swizzle mode (0 none, 1 128B, 2 64B, 3 32B);
  - K-major operand with 128B swizzle, 16-bit elements: row i, k j of the 16-k slice is at the logical
    address start + (i // 8) * SBO + (i % 8) * 128 + 2 j, and the 128B swizzle XORs address bits [4, 7)
    with bits [7, 10) (so atoms must be 1024-byte aligned, base offset 0); LBO is not used;
  - wgmma m64nNk16 D fragment: register i of thread t of the warpgroup holds D[row, col] with
    row = 16 (t // 32) + (t % 32) // 4 + 8 ((i // 2) % 2), col = 8 (i // 4) + 2 (t % 4) + i % 2.
The model runs whole CTAs on a byte array standing for shared memory (filled with 0xFF, i.e. NaN in
bf16/fp16, so a read of a never-written byte poisons the result): prologue, cp.async zero fill, the register
-staged weight dequantization, the 3-stage ring, each wgmma's operand reads performed at the wait_group
point (after the overlapping store of the next-but-one stage, so a write-after-read race shows), the
accumulator fragments and the epilogue, then compares the output with numpy. It also checks that the
grouped raster covers every tile once, that the dequantized tile stores are bank-conflict free, and that
the aligned stages fit the dynamic shared memory the launcher asks for.

  python scripts/emulate_wgmma.py        # all cases, a few seconds
"""
from __future__ import annotations

import sys

import numpy as np
import torch

# ---------------------------------------------------------------- kernel constants (wgmma_int4.cuh)
kBK, kRowBytes, kAtomBytes, kBN, kStages, kWgRows = 64, 128, 1024, 128, 3, 64


def threads(BM):
    return BM // kWgRows * 128


def stage_bytes(BM):
    return (BM + kBN) * kRowBytes


def smem_bytes(BM):
    return kStages * stage_bytes(BM) + kAtomBytes


def swz128(r, c):
    return r * kRowBytes + ((c ^ (r & 7)) << 4)


def make_desc(addr):
    d = (addr & 0x3FFFF) >> 4
    d |= 1 << 16
    d |= (kAtomBytes >> 4) << 32
    d |= 1 << 62
    return d


# ---------------------------------------------------------------- hardware model (PTX ISA)
def hw_operand(smem, desc, rows, dtype):
    """The [rows, 16] 16-bit operand a wgmma reads through `desc` (K-major), as float64."""
    start = (desc & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    base_off = (desc >> 49) & 7
    mode = (desc >> 62) & 3
    assert mode == 1 and base_off == 0, "model covers K-major 128B swizzle with base offset 0"
    i = np.arange(rows)[:, None]
    j = np.arange(16)[None, :]
    logical = start + (i // 8) * sbo + (i % 8) * 128 + 2 * j
    phys = logical ^ (((logical >> 7) & 7) << 4)
    assert phys.max() + 1 < smem.size
    bits = smem[phys].astype(np.uint16) | (smem[phys + 1].astype(np.uint16) << 8)
    return from_bits(bits, dtype)


def hw_d_coord(t, i):
    return 16 * (t // 32) + (t % 32) // 4 + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * (t % 4) + i % 2


# ---------------------------------------------------------------- 16-bit helpers
def to_bits(v32, dtype):
    """fp32 numpy -> uint16 bits of dtype (round to nearest even, torch's conversion = the kernel's)."""
    return torch.from_numpy(np.ascontiguousarray(v32, dtype=np.float32)).to(dtype).view(torch.int16).numpy().view(np.uint16)


def from_bits(bits, dtype):
    t = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(dtype)
    return t.to(torch.float64).numpy()


def byte_to_f32(w, b):
    return np.float32((w >> (8 * b)) & 0xFF)


def dequant32(raw16, s, o):
    """dequant32 of the kernel: 16 bytes of nibbles -> 32 fp32 values in the kernel's order."""
    out = []
    for i in range(4):
        w = int.from_bytes(bytes(raw16[4 * i:4 * i + 4]), "little")
        lo, hi = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
        f = []
        for b in range(4):
            f += [byte_to_f32(lo, b), byte_to_f32(hi, b)]
        out += [np.float32(np.float32(v * np.float32(s)) + np.float32(o)) for v in f]
    return np.array(out, dtype=np.float32)


# ---------------------------------------------------------------- one CTA of the kernel
def run_cta(pid, BM, a, smem_base_raw, dtype, out):
    nthreads = threads(BM)
    kXChunks = BM * (kRowBytes // 16) // nthreads
    kPieces = kBN * (kBK // 32) // nthreads
    M, N, K = a["M"], a["N"], a["K"]
    smem = np.full(smem_base_raw + smem_bytes(BM), 0xFF, dtype=np.uint8)  # the window up to the CTA's end
    smem_raw = smem_base_raw
    smem0 = smem_raw + ((kAtomBytes - (smem_raw & (kAtomBytes - 1))) & (kAtomBytes - 1))
    assert smem0 % kAtomBytes == 0 and smem0 + kStages * stage_bytes(BM) <= smem_raw + smem_bytes(BM)
    assert smem0 + kStages * stage_bytes(BM) <= 1 << 18  # the descriptor's 14-bit (>> 4) address field

    kRasterM = 8
    tiles_m, tiles_n = (M + BM - 1) // BM, (N + kBN - 1) // kBN
    per_group = kRasterM * tiles_n
    first_m = (pid // per_group) * kRasterM
    gm = min(tiles_m - first_m, kRasterM)
    tile_m = first_m + (pid % per_group) % gm
    tile_n = (pid % per_group) // gm
    m_base, n_base = tile_m * BM, tile_n * kBN
    KT = (K + kBK - 1) // kBK
    x_bits, qw, sc, of = a["x_bits"], a["qw"], a["scales"], a["offsets"]

    def load_x(s, kt):
        sx = smem0 + s * stage_bytes(BM)
        for tid in range(nthreads):
            for i in range(kXChunks):
                idx = tid + i * nthreads
                r, c = idx // 8, idx % 8
                gmr, gk = m_base + r, kt * kBK + c * 8
                ok = gmr < M and gk < K
                dst = sx + swz128(r, c)
                assert dst % 16 == 0
                chunk = x_bits[gmr, gk:gk + 8].view(np.uint8) if ok else np.zeros(16, np.uint8)
                smem[dst:dst + 16] = chunk

    regs = {}

    def load_w(kt):
        for tid in range(nthreads):
            for i in range(kPieces):
                idx = tid + i * nthreads
                n, k = n_base + idx // 2, kt * kBK + (idx % 2) * 32
                if n < N and k < K:
                    assert (n * (K // 2) + k // 2) % 16 == 0
                    regs[tid, i] = (qw[n, k // 2:k // 2 + 16], sc[n, k // a["group"]], of[n, k // a["group"]])
                else:
                    regs[tid, i] = (np.zeros(16, np.uint8), np.float32(0), np.float32(0))

    def store_w(s):
        sw = smem0 + s * stage_bytes(BM) + BM * kRowBytes
        for tid in range(nthreads):
            for i in range(kPieces):
                idx = tid + i * nthreads
                r, h = idx // 2, idx % 2
                v = to_bits(dequant32(*regs[tid, i]), dtype)  # 32 values = 16 words = 4 x 16 bytes
                for j in range(4):
                    dst = sw + swz128(r, 4 * h + j)
                    smem[dst:dst + 16] = v[8 * j:8 * j + 8].view(np.uint8)

    acc = np.zeros((BM // kWgRows, 128, 64))  # [warpgroup, thread, register]
    t_idx = np.arange(128)[:, None]
    i_idx = np.arange(64)[None, :]
    d_row, d_col = hw_d_coord(t_idx, i_idx)

    for s in range(kStages - 1):
        if s < KT:
            load_x(s, s)
            load_w(s)
            store_w(s)
    for kt in range(KT):
        nk = kt + kStages - 1
        refill = nk < KT
        if refill:
            load_x(nk % kStages, nk)
            load_w(nk)
        issued = []
        for wg in range(BM // kWgRows):
            sx = smem0 + (kt % kStages) * stage_bytes(BM) + wg * kWgRows * kRowBytes
            sw = smem0 + (kt % kStages) * stage_bytes(BM) + BM * kRowBytes
            for ks in range(kBK // 16):
                issued.append((wg, make_desc(sx + 32 * ks), make_desc(sw + 32 * ks)))
        if refill:
            store_w(nk % kStages)
        # wgmma.wait_group 0: the model performs the asynchronous reads here, after the overlapping stores
        for wg, da, db in issued:
            A = hw_operand(smem, da, 64, dtype)
            B = hw_operand(smem, db, 128, dtype)
            D = A @ B.T
            acc[wg] += D[d_row, d_col]

    # epilogue (kernel formulas)
    for wg in range(BM // kWgRows):
        for t in range(128):
            warp, lane = t // 32, t % 32
            row0 = m_base + wg * kWgRows + 16 * warp + lane // 4
            col0 = n_base + 2 * (lane % 4)
            for i in range(64):
                m = row0 + 8 * ((i // 2) % 2)
                n = col0 + 8 * (i // 4) + i % 2
                if m < M and n < N:
                    v = acc[wg, t, i]
                    if a["bias"] is not None:
                        v += a["bias"][n]
                    assert np.isnan(out[m, n]), f"({m}, {n}) written twice"
                    out[m, n] = v
    return tile_m, tile_n


def check_static():
    # D fragment: a bijection onto [64, 128]
    t, i = np.meshgrid(np.arange(128), np.arange(64), indexing="ij")
    r, c = hw_d_coord(t, i)
    assert len(set(zip(r.ravel().tolist(), c.ravel().tolist()))) == 64 * 128
    # kernel tile writes land exactly where the descriptor reads: chunk c of row r == logical row r, bytes 16c..
    for r in range(16):
        for c in range(8):
            logical = (r // 8) * kAtomBytes + (r % 8) * 128 + 16 * c
            assert logical ^ (((logical >> 7) & 7) << 4) == swz128(r, c)
    # dequantized-tile stores (16 B per thread, 8 threads per shared-memory wavefront): distinct 16-byte bank groups
    for BM in (64, 128):
        n = threads(BM)
        for i in range(kBN * 2 // n):
            for j in range(4):
                for q0 in range(0, n, 8):
                    groups = {(swz128((tid + i * n) // 2, 4 * ((tid + i * n) % 2) + j) // 16) % 8 for tid in range(q0, q0 + 8)}
                    assert len(groups) == 8, (BM, i, j, q0)
        # x-tile cp.async chunks of 8 consecutive threads: one row, 8 distinct bank groups
        for q0 in range(0, n, 8):
            groups = {(swz128(tid // 8, tid % 8) // 16) % 8 for tid in range(q0, q0 + 8)}
            assert len(groups) == 8
    # descriptor fields round-trip
    d = make_desc(0x12340)
    assert (d & 0x3FFF) << 4 == 0x12340 and ((d >> 32) & 0x3FFF) << 4 == 1024 and (d >> 62) == 1


def run_case(M, N, K, G, BM, dtype, bias=True, seed=0, smem_base_raw=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32)).to(dtype)
    qw = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    scales = (rng.random((N, K // G)) * 0.02 + 1e-3).astype(np.float32)
    offsets = (-8 * scales + rng.standard_normal((N, K // G)).astype(np.float32) * 0.01).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    a = dict(M=M, N=N, K=K, group=G, x_bits=x.view(torch.int16).numpy().view(np.uint16), qw=qw, scales=scales,
             offsets=offsets, bias=b)
    out = np.full((M, N), np.nan)
    tiles = ((M + BM - 1) // BM) * ((N + kBN - 1) // kBN)
    seen = set()
    for pid in range(tiles):
        seen.add(run_cta(pid, BM, a, smem_base_raw, dtype, out))
    assert len(seen) == tiles, "raster maps two CTAs to one tile"
    # reference: canonical dequantization (fp32 q * s, + o, rounded to dtype), float64 matmul
    q = np.empty((N, K), np.float32)
    q[:, 0::2] = qw & 0xF
    q[:, 1::2] = qw >> 4
    srep, orep = np.repeat(scales, G, axis=1), np.repeat(offsets, G, axis=1)
    w = torch.from_numpy((q * srep + orep).astype(np.float32)).to(dtype).double().numpy()
    ref = x.double().numpy() @ w.T + (0 if b is None else b.astype(np.float64))
    assert not np.isnan(out).any(), "unwritten output or a read of unwritten shared memory"
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err < 1e-12, f"M={M} N={N} K={K} G={G} BM={BM} {dtype}: max rel err {err}"
    return err


CASES = [  # (M, N, K, G, BM, dtype, bias, smem_base_raw)
    (17, 33, 128, 32, 64, torch.bfloat16, True, 0),
    (64, 128, 64, 64, 64, torch.float16, False, 16),
    (100, 130, 96, 32, 64, torch.bfloat16, True, 400),   # K tail: half of the second k tile out of range
    (129, 257, 256, 128, 128, torch.float16, True, 1008),  # M and N tails, 4 k tiles through the 3-stage ring
    (200, 140, 320, 64, 128, torch.bfloat16, False, 0),   # 5 k tiles: every stage reused
    (1100, 129, 64, 32, 128, torch.bfloat16, True, 0),   # 9 row tiles x 2 column tiles: grouped raster wraps
]


def main(argv):
    check_static()
    print("static checks: descriptor, swizzle, D fragment, bank groups ok")
    for c in CASES:
        if argv and not any(s in str(c) for s in argv):
            continue
        err = run_case(*c[:6], bias=c[6], smem_base_raw=c[7])
        print(f"M={c[0]} N={c[1]} K={c[2]} G={c[3]} BM={c[4]} {c[5]} bias={c[6]}: ok (max rel err {err:.1e})")


if __name__ == "__main__":
    main(sys.argv[1:])
