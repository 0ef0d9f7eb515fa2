"""One call of each GPU kernel worth a hardware profile, each between cudaProfilerStart and cudaProfilerStop, for
`ncu --profile-from-start off` (scripts/gpu_profile.sh runs it so): only those calls' kernels are profiled, not
the set-up, the warm-up calls or the reference checks.

Why: the first GPU run timed several kernels at one memory latency per loop iteration or a third of the memory
bandwidth (docs/notes/gpu-run-2026-11-29.md, cuda-int4-prefill-splitk.md); the timings alone do not say whether
a kernel waits on memory, on its barriers or on issue. ncu's SpeedOfLight / Occupancy / WarpStateStats sections
do, and they can be read in a session without a GPU.

Cases (Llama-3-8B shapes, bf16; each name says its route; `--list` prints them):
  decode.*      decode_attention B = 64, L = 4096, 32 / 8 heads, D = 128: contiguous (register loop), the
                pipelined loop, paged 64-token blocks, the tensor-core kernel (contiguous, paged)
  int4.*        Int4Linear (packed) M = 1 / 16 / 64 / 1024, the op on canonical weights at M = 1024 (wgmma on
                sm_90, mma.sync), and M = 64 without split-K
  int8.*        Int8Linear W8A8 M = 1024 (mma.sync) and the sm_90a kernel; W8A16 M = 1
  attn.*        causal prefill attention S = 4096 (sm_80 kernel; the sm_90a kernel on sm_90)
  ref.*         F.linear bf16 at M = 1 / 1024 and SDPA decode, as references of what the hardware gives

Each case runs twice before its profiled call (Triton / module preparation, packing, shared-memory opt-ins,
cuBLAS handles) and its result is checked loosely against a float reference, so that a profile of a wrong kernel
does not pass unnoticed. A case that fails prints its error and the rest go on.

Usage: python benchmarks/profile_kernels.py [--cases REGEX] [--family NAME] [--list] [--device cpu]
(--device cpu: the plumbing only, with small shapes and the cpu backend; tests/test_profile_kernels.py.)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
import time

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def switch(op_module: str, name: str, value):
    """llmkern.ops.<op_module>.<name> = value inside (the CUDA adapters read their route switches per call)."""
    mod = importlib.import_module(f"llmkern.ops.{op_module}")
    before = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, before)


class Cases:
    """Builders of (call, check) per case name; `small` shrinks every shape for the cpu plumbing test."""

    def __init__(self, device: str):
        self.dev, self.small = device, device == "cpu"
        self.backend = "cpu" if self.small else "cuda"
        self.dt = torch.float32 if self.small else torch.bfloat16
        self._g = None  # (made at first use: listing the cases needs no GPU)

    @property
    def g(self) -> torch.Generator:
        if self._g is None:
            self._g = torch.Generator(device=self.dev).manual_seed(0)
        return self._g

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, generator=self.g, device=self.dev).to(dtype or self.dt)

    def names(self) -> list[str]:
        return [n[len("case_"):].replace("__", ".") for n in dir(self) if n.startswith("case_")]

    def build(self, name: str):
        return getattr(self, "case_" + name.replace(".", "__"))()

    # ---------------------------------------------------------------- decode attention
    def _decode(self, paged: bool):
        from llmkern.ops import decode_attention

        B, L, Hq, Hk, D = (2, 256, 8, 2, 64) if self.small else (64, 4096, 32, 8, 128)
        q = self.randn(B, Hq, D)
        bs = 64
        if paged:
            nb = B * L // bs
            k, v = self.randn(nb, bs, Hk, D), self.randn(nb, bs, Hk, D)
            perm = torch.randperm(nb, generator=torch.Generator().manual_seed(1)).to(self.dev)
            table = perm.view(B, L // bs).to(torch.int32)  # [B, L / bs]: scattered blocks
        else:
            k, v, table = self.randn(B, L, Hk, D), self.randn(B, L, Hk, D), None
        lens = torch.full((B,), L, dtype=torch.int32, device=self.dev)

        def call():
            return decode_attention(q, k, v, lens, block_table=table, backend=self.backend)

        def check(out):
            kk = k[table.long()].reshape(B, L, Hk, D) if paged else k
            vv = v[table.long()].reshape(B, L, Hk, D) if paged else v
            kk, vv = kk.repeat_interleave(Hq // Hk, 2), vv.repeat_interleave(Hq // Hk, 2)  # [B, L, Hq, D]
            ref = F.scaled_dot_product_attention(q[:, :, None].float(), kk.transpose(1, 2).float(),
                                                 vv.transpose(1, 2).float())[:, :, 0]  # [B, Hq, D]
            return _close(out, ref)

        return call, check

    def case_decode__contiguous(self):
        return self._decode(False)

    def case_decode__contiguous_pipelined(self):
        call, check = self._decode(False)
        return _switched("decode_attention", "CUDA_DECODE_PIPELINE", True, call), check

    def case_decode__paged64(self):
        return self._decode(True)

    def case_decode__contiguous_mma(self):
        call, check = self._decode(False)
        return _switched("decode_attention", "CUDA_DECODE_MMA", True, call), check

    def case_decode__paged64_mma(self):
        call, check = self._decode(True)
        return _switched("decode_attention", "CUDA_DECODE_MMA", True, call), check

    # ---------------------------------------------------------------- int4
    def _int4(self, M: int, N: int, K: int, G: int, module: bool):
        from llmkern.nn import Int4Linear
        from llmkern.ops import int4_linear

        if self.small:
            M, N, K = min(M, 40), min(N, 256), min(K, 512)
        # every nibble value, positive scales, offsets near -8 scale (GGUF Q4_0 / Q4_1-like), fp16-valued as GGUF's
        qw = torch.randint(0, 256, (N, K // 2), generator=self.g, device=self.dev, dtype=torch.uint8)
        s = (torch.rand(N, K // G, generator=self.g, device=self.dev) * 0.02 + 1e-3).half().float()
        o = (-8 * s + torch.randn(N, K // G, generator=self.g, device=self.dev) * 0.01).half().float()
        x = self.randn(M, K)
        if module:
            m = Int4Linear.from_quantized(qw, s, o, None, backend=self.backend)
            call = lambda: m(x)  # noqa: E731
        else:
            call = lambda: int4_linear(x, qw, s, o, None, backend=self.backend)  # noqa: E731
        w_deq = (qw_unpack(qw).float() * s.repeat_interleave(G, 1) + o.repeat_interleave(G, 1))  # [N, K]
        return call, lambda out: _close(out, x.float() @ w_deq.t())

    def case_int4__module_m1(self):
        return self._int4(1, 14336, 4096, 128, True)

    def case_int4__module_m16(self):
        return self._int4(16, 14336, 4096, 32, True)

    def case_int4__module_m64(self):
        return self._int4(64, 4096, 14336, 32, True)

    def case_int4__module_m64_no_splitk(self):
        call, check = self._int4(64, 4096, 14336, 32, True)
        return _switched("int4_linear", "CUDA_GEMM_SPLITK", False, call), check

    def case_int4__module_m1024(self):
        return self._int4(1024, 4096, 14336, 32, True)

    def case_int4__op_m1024(self):  # wgmma on sm_90 (the default there), else mma.sync
        return self._int4(1024, 4096, 14336, 32, False)

    def case_int4__op_m1024_mma(self):
        call, check = self._int4(1024, 4096, 14336, 32, False)
        return _switched("int4_linear", "CUDA_INT4_WGMMA", False, call), check

    # ---------------------------------------------------------------- int8
    def _int8(self, M: int, N: int, K: int, mode: str):
        from llmkern.nn import Int8Linear

        if self.small:
            M, N, K = min(M, 40), min(N, 256), min(K, 512)
        w = torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(2), dtype=torch.int8).to(self.dev)
        scale = torch.rand(N, generator=torch.Generator().manual_seed(3)).to(self.dev) * 0.002 + 1e-4
        x = self.randn(M, K)
        m = Int8Linear.from_quantized(w, scale, None, mode=mode, backend=self.backend)
        ref = x.float() @ (w.float() * scale[:, None]).t()
        return (lambda: m(x)), (lambda out: _close(out, ref, 3e-2 if mode == "w8a8" else 1e-2))

    def case_int8__w8a8_m1024(self):
        return self._int8(1024, 4096, 14336, "w8a8")

    def case_int8__w8a8_m1024_sm90(self):
        call, check = self._int8(1024, 4096, 14336, "w8a8")
        return _switched("int8_linear", "CUDA_W8A8_WGMMA", True, call), check

    def case_int8__w8a16_m1(self):
        return self._int8(1, 14336, 4096, "w8a16")

    # ---------------------------------------------------------------- prefill attention
    def _attn(self, sm90: bool):
        from llmkern.ops import attention

        S, Hq, Hk, D = (128, 4, 2, 64) if self.small else (4096, 32, 8, 128)
        q, k, v = self.randn(S, Hq, D), self.randn(S, Hk, D), self.randn(S, Hk, D)
        cu = torch.tensor([0, S], dtype=torch.int32, device=self.dev)

        def call():
            return attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend=self.backend)

        def check(out):
            kk, vv = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
            ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), kk.transpose(0, 1)[None].float(),
                                                 vv.transpose(0, 1)[None].float(), is_causal=True)[0].transpose(0, 1)
            return _close(out, ref)

        if sm90:
            return _switched("attention", "_CUDA_WGMMA", True, call), check
        return call, check

    def case_attn__causal_s4096(self):
        return self._attn(False)

    def case_attn__causal_s4096_sm90(self):
        return self._attn(True)

    # ---------------------------------------------------------------- references
    def _flinear(self, M: int, N: int, K: int):
        if self.small:
            M, N, K = min(M, 40), min(N, 256), min(K, 512)
        w, x = self.randn(N, K) * K ** -0.5, self.randn(M, K)
        return (lambda: F.linear(x, w)), (lambda out: _close(out, x.float() @ w.float().t()))

    def case_ref__flinear_m1(self):
        return self._flinear(1, 14336, 4096)

    def case_ref__flinear_m1024(self):
        return self._flinear(1024, 4096, 14336)

    def case_ref__sdpa_decode(self):
        B, L, Hq, Hk, D = (2, 256, 8, 2, 64) if self.small else (64, 4096, 32, 8, 128)
        q, k, v = self.randn(B, Hq, 1, D), self.randn(B, Hk, L, D), self.randn(B, Hk, L, D)
        return ((lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
                (lambda out: torch.isfinite(out).all().item()))


def qw_unpack(qw: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] (low nibble even k) -> [N, K] values 0..15."""
    return torch.stack([qw & 0xF, qw >> 4], dim=-1).reshape(qw.shape[0], -1)


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> bool:
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    if not err <= tol:
        print(f"    relative error {err:.3g} > {tol}", flush=True)
    return err <= tol


_OP_MODULES = {"decode": "decode_attention", "int4": "int4_linear", "int8": "int8_linear", "attn": "attention"}


def _route(name: str) -> str:
    """The route the op's CUDA adapter reports for its last call, where it reports one (decode_attention and
    int8_linear: _last_cuda_path; attention: _last_cuda_kernel); int4_linear's launcher path is not kept."""
    mod = _OP_MODULES.get(name.split(".")[0])
    if mod is None:
        return "torch"
    m = importlib.import_module(f"llmkern.ops.{mod}")
    for attr in ("_last_cuda_path", "_last_cuda_kernel"):
        if getattr(m, attr, None) is not None:
            return f"{attr}={getattr(m, attr)}"
    return "route not reported"


def _switched(op_module, name, value, call):
    def run():
        with switch(op_module, name, value):
            return call()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=".", help="regex over case names (default: all)")
    ap.add_argument("--family", default=None, help="only the cases <family>.* (decode, int4, int8, attn, ref)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    cases = Cases(args.device)
    names = [n for n in cases.names() if re.search(args.cases, n)
             and (args.family is None or n.split(".")[0] == args.family)]
    if args.list:
        print("\n".join(names))
        return 0
    cuda = args.device == "cuda"
    if cuda and torch.cuda.get_device_capability() != (9, 0):
        names = [n for n in names if "sm90" not in n]
    bad = 0
    for i, name in enumerate(names):
        t0 = time.time()
        try:
            call, check = cases.build(name)
            out = call()
            call()
            if cuda:
                torch.cuda.synchronize()
            ok = check(out)
            if cuda:
                torch.cuda.profiler.start()  # cudaProfilerStart: ncu --profile-from-start off profiles from here
            out = call()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
            print(f"[{i + 1}/{len(names)}] {name}: profiled ({'checked' if ok else 'WRONG RESULT'}; {_route(name)}; "
                  f"{time.time() - t0:.1f} s)", flush=True)
            bad += not ok
        except Exception as err:  # noqa: BLE001 (one case's failure must not cost the others' profiles)
            bad += 1
            print(f"[{i + 1}/{len(names)}] {name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        finally:
            if cuda:
                torch.cuda.profiler.stop()  # (if the profiled call raised)
                torch.cuda.empty_cache()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
