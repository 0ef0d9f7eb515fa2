"""Lane-level CPU emulation of csrc/include/llmkern/cuda/attention.cuh (index math, fragment layouts,
swizzle, cp.async zero fill, double buffers, masks, online softmax), driven through the real adapter
(llmkern.ops.attention._cuda_launch) with a fake module, checked against the reference. No GPU needed:
it re-checks the kernel's index math after a change (it mirrors the kernel line by line, so keep the two
in step). Slow (numpy per warp): small shapes only, a few minutes for everything.

  python scripts/emulate_cuda_attention.py [filter]     # filter: substring of a case name, or "band"
  EMU_WIDE=1 python scripts/emulate_cuda_attention.py 128)   # the D=128 128-row-tile variant

ldmatrix / mma fragment layouts follow the PTX ISA:
  mma.m16n8k16 A (row): reg r of lane l holds (row g + 8*(r&1), cols 2t + 8*(r>>1) + {0,1}), g=l/4, t=l%4
  B (col): reg r holds (k = 2t + 8r + {0,1}, n = g); C: c[e] = (row g + 8*(e>>1), col 2t + (e&1))
  ldmatrix x4: matrix j's row i at the address of lane 8j+i; reg j of lane l = matrix j (row l/4,
  cols 2(l%4)+{0,1}); .trans: (rows 2(l%4)+{0,1}, col l/4).
"""
import ctypes
import math
import os
import sys

import numpy as np
import torch

LANES = np.arange(32)
G_, T_ = LANES // 4, LANES % 4


def round_to(x, dtype):
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(dtype).to(torch.float64).numpy()


class Emu:
    def __init__(self, dtype_code, q, k, v, qs, ks, vs, B, Sq, Sk, Hq, Hk, D, cu_q, cu_k, Tq, Tk, scale, causal,
                 wl, wr, softcap, out, lse, stream, wide=False):
        self.T = torch.bfloat16 if dtype_code == 1 else torch.float16
        assert dtype_code in (1, 2) and D in (64, 128)
        self.D = D
        self.NW, self.BN = (8, 64) if (D == 64 or wide) else (4, 64)
        packed = cu_q != 0
        self.B, self.Hq, self.group = B, Hq, Hq // Hk
        # global memory views
        def ext(s, n0, n1, n2):
            return max(0, (n0 - 1) * s[0] + (n1 - 1) * s[1] + (n2 - 1) * s[2] + D) if min(n0, n1, n2) > 0 else 0
        if packed:
            qn, kn = ext(qs, 1, Tq, Hq), ext(ks, 1, Tk, Hk)
            vn = ext(vs, 1, Tk, Hk)
            self.cu_q = np.ctypeslib.as_array((ctypes.c_int32 * (B + 1)).from_address(cu_q)).copy()
            self.cu_k = np.ctypeslib.as_array((ctypes.c_int32 * (B + 1)).from_address(cu_k)).copy()
            on = Tq * Hq * D
            ln = Hq * Tq
        else:
            qn, kn, vn = ext(qs, B, Sq, Hq), ext(ks, B, Sk, Hk), ext(vs, B, Sk, Hk)
            self.cu_q = None
            on = B * Sq * Hq * D
            ln = B * Hq * Sq
        self.q, self.k, self.v = (self.view(p, n) for p, n in ((q, qn), (k, kn), (v, vn)))
        self.out_ptr, self.on = out, on
        self.out = np.zeros(on)
        self.lse = np.ctypeslib.as_array((ctypes.c_float * ln).from_address(lse)) if lse else None
        self.qs, self.ks, self.vs = qs, ks, vs
        self.Sq, self.Sk, self.Tq = Sq, Sk, Tq
        log2e = 1.4426950408889634
        self.scale_log2 = scale * log2e
        self.softcap_log2 = softcap * log2e if softcap > 0 else 0.0
        self.inv_softcap = scale / softcap if softcap > 0 else 0.0
        kmax = 1 << 30
        self.wl = min(wl, kmax - 1)
        self.wr = 0 if causal else min(wr, kmax - 1)
        self.written = np.zeros(on, dtype=bool)

    def view(self, ptr, n):
        if n == 0:
            return np.zeros(0)
        raw = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(ptr)).copy()
        if self.T == torch.bfloat16:
            return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return raw.view(np.float16).astype(np.float64)

    # ---- smem helpers (element offsets)
    def swz(self, row, chunk):
        return row * self.D + ((chunk ^ (row & 7)) << 3)

    def load_tile(self, smem, base_el, g, gbase, stride, valid, R):
        D, NT = self.D, 32 * self.NW
        kC = D // 8
        assert (R * kC) % NT == 0
        for tid in range(NT):
            for i in range(R * kC // NT):
                c = tid + i * NT
                row, ch = c // kC, c % kC
                dst = base_el + self.swz(row, ch)
                if row < valid:
                    src = gbase + row * stride + ch * 8
                    smem[dst:dst + 8] = g[src:src + 8]
                else:
                    smem[dst:dst + 8] = 0.0

    def ldmatrix_x4(self, smem, addrs, trans=False):
        """addrs: [32] element offsets (lane 8j+i -> row i of matrix j). Returns regs [4][32][2]."""
        mats = np.stack([np.stack([smem[addrs[8 * j + i]:addrs[8 * j + i] + 8] for i in range(8)]) for j in range(4)])
        out = np.zeros((4, 32, 2))
        for j in range(4):
            if not trans:
                out[j, :, 0] = mats[j, LANES // 4, 2 * (LANES % 4)]
                out[j, :, 1] = mats[j, LANES // 4, 2 * (LANES % 4) + 1]
            else:
                out[j, :, 0] = mats[j, 2 * (LANES % 4), LANES // 4]
                out[j, :, 1] = mats[j, 2 * (LANES % 4) + 1, LANES // 4]
        return out

    @staticmethod
    def mma(c, a, b0, b1):
        """c [32][4] fp32 acc, a [4][32][2], b0/b1 [32][2] -> c + A @ B (per PTX layouts)."""
        A = np.zeros((16, 16))
        for r in range(4):
            for e in range(2):
                A[G_ + 8 * (r & 1), 2 * T_ + 8 * (r >> 1) + e] = a[r][:, e]
        Bm = np.zeros((16, 8))
        for r, b in enumerate((b0, b1)):
            for e in range(2):
                Bm[2 * T_ + 8 * r + e, G_] = b[:, e]
        Cm = A @ Bm
        res = c.copy()
        for e in range(4):
            res[:, e] += Cm[G_ + 8 * (e >> 1), 2 * T_ + (e & 1)]
        return res

    def run(self):
        BM = 16 * self.NW
        max_q = self.Tq if self.cu_q is not None else self.Sq
        gy = (max_q + BM - 1) // BM
        for bx in range(self.B * self.Hq):
            for by in range(gy):
                self.block(bx, by, gy)
        # write out (only the elements the kernel wrote)
        dst = np.ctypeslib.as_array((ctypes.c_uint16 * self.on).from_address(self.out_ptr))
        vals = torch.from_numpy(self.out.astype(np.float32)).to(self.T).view(torch.int16).numpy().view(np.uint16)
        dst[self.written] = vals[self.written]

    def block(self, bx, by, gy):
        D, NW, BN = self.D, self.NW, self.BN
        NT, BM = 32 * NW, 16 * NW
        NB, KD, ND = BN // 8, D // 16, D // 8
        b, h = bx // self.Hq, bx % self.Hq
        kh = h // self.group
        m0 = (gy - 1 - by) * BM
        if self.cu_q is not None:
            q0, k0 = int(self.cu_q[b]), int(self.cu_k[b])
            q_len, k_len = int(self.cu_q[b + 1]) - q0, int(self.cu_k[b + 1]) - k0
            q_tok0 = q0
            q_base, k_base, v_base = q0 * self.qs[1], k0 * self.ks[1], k0 * self.vs[1]
            lse_base, lse_sh = q0, self.Tq
        else:
            q_len, k_len = self.Sq, self.Sk
            q_tok0 = b * self.Sq
            q_base, k_base, v_base = b * self.qs[0], b * self.ks[0], b * self.vs[0]
            lse_base, lse_sh = b * self.Hq * self.Sq, self.Sq
        if m0 >= q_len:
            return
        softcap = self.softcap_log2 > 0
        mult = 1.0 if softcap else self.scale_log2
        diag = k_len - q_len
        m_last = min(m0 + BM, q_len) - 1
        lo, hi = 0, k_len
        if self.wl >= 0:
            lo = max(0, m0 + diag - self.wl)
        if self.wr >= 0:
            hi = min(k_len, m_last + diag + self.wr + 1)
        t_begin = lo // BN
        t_end = (hi + BN - 1) // BN if hi > lo else t_begin
        qg = q_base + h * self.qs[2]
        kg = k_base + kh * self.ks[2]
        vg = v_base + kh * self.vs[2]
        og = (q_tok0 + m0) * self.Hq * D + h * D
        o_st = self.Hq * D
        smem = np.full(BM * D + 4 * BN * D, np.nan)  # uninitialized shared memory: NaN
        sQ, sK, sV = 0, BM * D, BM * D + 2 * BN * D
        tile = BN * D
        o = np.zeros((NW, ND, 32, 4))
        m_run = np.full((NW, 32, 2), -np.inf)
        l_run = np.zeros((NW, 32, 2))
        if t_begin < t_end:
            self.load_tile(smem, sQ, self.q, qg + m0 * self.qs[1], self.qs[1], q_len - m0, BM)
            self.load_tile(smem, sK, self.k, kg + t_begin * BN * self.ks[1], self.ks[1], k_len - t_begin * BN, BN)
            self.load_tile(smem, sV, self.v, vg + t_begin * BN * self.vs[1], self.vs[1], k_len - t_begin * BN, BN)
            # per-lane byte offsets of the first 16 x 16 block, then (off ^ (i << 5)) + 16-row steps
            L = np.arange(32)
            k_off = np.array([self.swz((l & 7) + (l >> 4) * 8, (l >> 3) & 1) * 2 for l in range(32)])
            v_off = np.array([self.swz((l & 7) + ((l >> 3) & 1) * 8, l >> 4) * 2 for l in range(32)])
            qa = []
            for w in range(NW):
                r0 = w * 16
                q_off = np.array([self.swz(r0 + (l & 7) + ((l >> 3) & 1) * 8, l >> 4) * 2 for l in range(32)])
                qa.append([self.ldmatrix_x4(smem, sQ + (q_off ^ (kk << 5)) // 2) for kk in range(KD)])
            pending_v = None
            for t in range(t_begin, t_end):
                buf = (t - t_begin) & 1
                n0 = t * BN
                if t + 1 < t_end:  # K[t+1] into buf^1 (issued after the sync: nobody reads buf^1 now)
                    self.load_tile(smem, sK + (buf ^ 1) * tile, self.k, kg + (n0 + BN) * self.ks[1], self.ks[1],
                                   k_len - (n0 + BN), BN)
                S_all = []
                for w in range(NW):
                    r0 = w * 16
                    s = np.zeros((NB, 32, 4))
                    kt = sK + buf * tile
                    for kk in range(KD):
                        ka = kt * 2 + (k_off ^ (kk << 5))  # bytes
                        for jp in range(NB // 2):
                            kb = self.ldmatrix_x4(smem, (ka + jp * 32 * D) // 2)
                            s[2 * jp] = self.mma(s[2 * jp], qa[w][kk], kb[0], kb[1])
                            s[2 * jp + 1] = self.mma(s[2 * jp + 1], qa[w][kk], kb[2], kb[3])
                    if softcap:
                        s = self.softcap_log2 * np.tanh(s * self.inv_softcap)
                    full = (n0 + BN <= k_len and (self.wr < 0 or n0 + BN - 1 <= m0 + diag + self.wr)
                            and (self.wl < 0 or n0 >= m_last + diag - self.wl))
                    if not full:
                        for hf in range(2):
                            pos = m0 + r0 + G_ + hf * 8 + diag
                            khi = np.minimum(k_len - 1, pos + self.wr) if self.wr >= 0 else np.full(32, k_len - 1)
                            klo = pos - self.wl if self.wl >= 0 else np.zeros(32, dtype=int)
                            for j in range(NB):
                                for e in range(2):
                                    key = n0 + j * 8 + 2 * T_ + e
                                    bad = (key > khi) | (key < klo)
                                    s[j, bad, hf * 2 + e] = -np.inf
                    for hf in range(2):
                        mx = s[:, :, hf * 2:hf * 2 + 2].max(axis=(0, 2))  # per lane
                        mx = np.maximum(mx, mx[LANES ^ 1])
                        mx = np.maximum(mx, mx[LANES ^ 2])
                        m_new = np.maximum(m_run[w, :, hf], mx)
                        m_sc = np.where(m_new == -np.inf, 0.0, m_new * mult)
                        with np.errstate(invalid="ignore"):
                            alpha = np.where(m_new > m_run[w, :, hf], np.exp2(m_run[w, :, hf] * mult - m_sc), 1.0)
                        m_run[w, :, hf] = m_new
                        pe = np.exp2(s[:, :, hf * 2:hf * 2 + 2] * mult - m_sc[None, :, None])
                        s[:, :, hf * 2:hf * 2 + 2] = pe
                        l_run[w, :, hf] = l_run[w, :, hf] * alpha + pe.sum(axis=(0, 2))
                        o[w, :, :, hf * 2:hf * 2 + 2] *= alpha[None, :, None]
                    S_all.append(s)
                # V[t] has landed; V[t+1] into buf^1
                if t + 1 < t_end:
                    self.load_tile(smem, sV + (buf ^ 1) * tile, self.v, vg + (n0 + BN) * self.vs[1], self.vs[1],
                                   k_len - (n0 + BN), BN)
                for w in range(NW):
                    s = round_to(S_all[w], self.T)
                    vt = sV + buf * tile
                    pas = [np.stack([s[2 * kk][:, 0:2], s[2 * kk][:, 2:4], s[2 * kk + 1][:, 0:2], s[2 * kk + 1][:, 2:4]])
                           for kk in range(BN // 16)]
                    for dp in range(D // 16):
                        va = vt * 2 + (v_off ^ (dp << 5))  # bytes
                        for kk in range(BN // 16):
                            vb = self.ldmatrix_x4(smem, (va + kk * 32 * D) // 2, trans=True)
                            o[w, 2 * dp] = self.mma(o[w, 2 * dp], pas[kk], vb[0], vb[1])
                            o[w, 2 * dp + 1] = self.mma(o[w, 2 * dp + 1], pas[kk], vb[2], vb[3])
        # epilogue
        for w in range(NW):
            r0 = w * 16
            inv = np.zeros((32, 2))
            for hf in range(2):
                l = l_run[w, :, hf]
                l = l + l[LANES ^ 1]
                l = l + l[LANES ^ 2]
                with np.errstate(divide="ignore"):
                    inv[:, hf] = np.where(l > 0, 1.0 / np.where(l > 0, l, 1.0), np.where(l == 0, 0.0, l))
                row = m0 + r0 + G_ + hf * 8
                if self.lse is not None:
                    for lane in range(32):
                        if T_[lane] == 0 and row[lane] < q_len:
                            L = l[lane]
                            val = m_run[w, lane, hf] * mult * math.log(2) + math.log(L) if L > 0 else (-math.inf if L == 0 else L)
                            self.lse[lse_base + h * lse_sh + row[lane]] = val
            # out through this warp's Q rows (swizzled), then 16-byte copies
            for n in range(ND):
                for hf in range(2):
                    row = r0 + G_ + hf * 8
                    for lane in range(32):
                        a = sQ + self.swz(row[lane], n) + 2 * T_[lane]
                        smem[a] = o[w, n, lane, hf * 2] * inv[lane, hf]
                        smem[a + 1] = o[w, n, lane, hf * 2 + 1] * inv[lane, hf]
            for i in range(16 * ND // 32):
                for lane in range(32):
                    c = lane + i * 32
                    row, ch = c // ND, c % ND
                    if m0 + r0 + row < q_len:
                        dst = og + (r0 + row) * o_st + ch * 8
                        src = sQ + self.swz(r0 + row, ch)
                        assert not self.written[dst:dst + 8].any(), "element written twice"
                        self.out[dst:dst + 8] = smem[src:src + 8]
                        self.written[dst:dst + 8] = True


class FakeMod:
    calls = 0

    def attention(self, *args):
        FakeMod.calls += 1
        Emu(*args).run()


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(root, "tests", "ops"))
    import llmkern  # noqa
    from llmkern import reference
    from llmkern.ops.attention import _cuda_launch
    from _attention_helpers import assert_lse, assert_rel, poisoned_outputs

    def ref(q, k, v, **kw):
        return reference.attention(q, k, v, kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"), kw.get("scale"),
                                   kw.get("causal", False), kw.get("window_left", -1), kw.get("window_right", -1),
                                   kw.get("softcap", 0.0))

    def run(q, k, v, **kw):
        with poisoned_outputs():
            return _cuda_launch(FakeMod(), 0, q, k, v, kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"), kw.get("scale"),
                                kw.get("causal", False), kw.get("window_left", -1), kw.get("window_right", -1),
                                kw.get("softcap", 0.0))

    fails = []

    def check(name, q, k, v, **kw):
        out, lse = run(q, k, v, **kw)
        rout, rlse = ref(q, k, v, **kw)
        try:
            assert_rel(out, rout, 1e-2)
            assert_lse(lse, rlse, 2e-5)
            print("ok  ", name, flush=True)
        except AssertionError as e:
            fails.append(name)
            print("FAIL", name, e, flush=True)

    torch.manual_seed(0)
    sel = sys.argv[1] if len(sys.argv) > 1 else ""
    if os.environ.get("EMU_WIDE") == "1":
        sys.modules["llmkern.ops.attention"]._CUDA_WIDE = True
        print("wide")
    masks = {
        "full": {}, "causal": dict(causal=True), "wl": dict(window_left=37), "wboth": dict(window_left=70, window_right=9),
        "cwl": dict(causal=True, window_left=20), "wr0": dict(window_right=0),
        "softcap": dict(causal=True, softcap=2.0, scale=0.5),
    }
    cases = [
        (1, 1, 1, 2, 2, 64), (1, 17, 17, 8, 2, 64), (1, 100, 257, 4, 1, 128), (1, 140, 70, 2, 2, 128),
        (2, 1, 130, 2, 1, 64), (1, 130, 200, 1, 1, 64),
    ]
    for case in cases:
        for mname, kw in masks.items():
            for dt in (torch.bfloat16, torch.float16):
                name = f"{case} {mname} {dt}"
                if sel and sel not in name:
                    continue
                B, Sq, Sk, Hq, Hk, D = case
                q = torch.randn(B, Sq, Hq, D).to(dt)
                k = torch.randn(B, Sk, Hk, D).to(dt)
                v = torch.randn(B, Sk, Hk, D).to(dt)
                check(name, q, k, v, **kw)
    # band edges at tile boundaries (the GPU test test_band_edges)
    if sel == "band":
        kws = [dict(causal=True, window_left=0), dict(window_left=0, window_right=0),
               dict(window_left=3, window_right=200), dict(causal=True, window_left=63),
               dict(causal=True, window_left=64), dict(window_left=500, window_right=-1)]
        for Sq, Sk in [(1, 1), (1, 200), (64, 64), (65, 64), (200, 1), (300, 129), (129, 300)]:
            for kw in kws:
                for D in (64, 128):
                    q = torch.randn(1, Sq, 2, D).bfloat16()
                    k, v = torch.randn(1, Sk, 1, D).bfloat16(), torch.randn(1, Sk, 1, D).bfloat16()
                    check(f"band Sq{Sq} Sk{Sk} {kw} D{D}", q, k, v, **kw)
        return fails
    # non-contiguous views
    if not sel or "view" in sel:
        for D in (64, 128):
            qkv = torch.randn(2, 70, 4 + 2 * 2, D).to(torch.bfloat16)
            q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
            check(f"view qkv D{D}", q, k, v, causal=True)
            q = torch.randn(2, 4, 70, 2 * D).to(torch.bfloat16).transpose(1, 2)[..., :D]
            k = torch.randn(4, 2, 90, D).to(torch.bfloat16).transpose(1, 2)[::2]
            v = torch.randn(2, 90, 2, D).to(torch.bfloat16)
            check(f"view mixed D{D}", q, k, v, window_left=30, window_right=5)
    # packed varlen
    if not sel or "packed" in sel:
        sq = [5, 0, 1, 17, 3, 0, 1, 150, 1]
        sk = [5, 0, 1, 20, 0, 4, 3, 130, 64]
        cu_q = torch.tensor([0] + sq).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + sk).cumsum(0).to(torch.int32)
        for D in (64, 128):
            for mname in ("full", "causal", "wboth", "softcap"):
                q = torch.randn(sum(sq) + 3, 4, D).to(torch.float16)
                k = torch.randn(sum(sk), 2, D).to(torch.float16)
                v = torch.randn(sum(sk), 2, D).to(torch.float16)
                check(f"packed D{D} {mname}", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **masks[mname])


    return fails


if __name__ == "__main__":
    failed = main()
    print(f"{len(failed)} failed" if failed else "all passed")
    sys.exit(1 if failed else 0)
