"""Profile one SmolLM2-135M decode step: what runs, how often, and where the time goes.

    python benchmarks/profile_decode.py [--threads 2] [--steps 50] [--ctx 64] [--quant keep|int8] [--batch B]
                                       [--dtype float32|bfloat16]

Prints (1) the median step time, (2) torch.profiler's table of aten/llmkern calls per step (every
torch op and allocation the step makes), (3) cProfile's top Python functions per step, split into
kernel time (llmkern._C.*) and everything else, and (4) when the decode plan's step program runs, the
time of each op's launches per step by the program's own clock (StepProgram.run_timed). A lean step
makes a fixed number of calls per layer (no Python work or allocation that grows with the context) and
spends most of its time in kernels. --batch B > 1 profiles a step of B sequences over paged caches (the
runtime's default block size), as `generate` runs several prompts.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--quant", default="keep")
    ap.add_argument("--act-int8", action="store_true", help="int8 activations (W4A8g / W8A8), as `generate --act-int8`")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (> 1: paged caches, as generate)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's activation dtype (as `generate --dtype`)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from llmkern.models import default_model_path, load_gguf

    model, tok = load_gguf(default_model_path(), quant=a.quant, dtype=getattr(torch, a.dtype))
    if a.act_int8:
        from llmkern.nn import set_linear_modes
        set_linear_modes(model, int4="w4a8g", int8="w8a8")
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 64)[:a.ctx]])
    B = a.batch
    nxt = torch.tensor([[tok.encode(" the")[0]]] * B)  # [B, 1]
    max_len = a.ctx + 4 * a.steps + 16
    with torch.inference_mode():
        if B == 1:
            cache, sids = model.new_cache(1, max_len), None
            model(ids, cache, last_only=True)
        else:  # B sequences over paged caches, each prefilled with the context on its own
            cache = model.new_cache(B, max_len, paged=True)
            sids = [[c.add_sequence() for c in cache][0] for _ in range(B)]
            for sid in sids:
                model(ids, cache, seq_ids=[sid], last_only=True)
        kw = {} if sids is None else {"seq_ids": sids}
        for _ in range(5):
            model(nxt, cache, last_only=True, **kw)
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            model(nxt, cache, last_only=True, **kw)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"decode step of {B} sequence(s): median {med * 1e3:.2f} ms over {a.steps} steps "
              f"({B / med:.0f} tokens/s), {a.threads} threads, {model.weight_bytes_per_token() / 1e6:.1f} MB of "
              f"weights per step, decode plan in use: {model.__dict__.get('_decode_plan') is not None}")

        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                model(nxt, cache, last_only=True, **kw)
        print(f"\ntorch ops per step (torch.profiler, {a.steps} steps; calls are totals):")
        print(prof.key_averages().table(sort_by="count", row_limit=15))

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.steps):
            model(nxt, cache, last_only=True, **kw)
        pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    kernel = sum(v[2] for k, v in st.stats.items() if "llmkern._C" in k[2])
    total = st.total_tt
    print(f"cProfile ({a.steps} steps; it slows Python down, so read shares, not times): "
          f"{total / a.steps * 1e3:.2f} ms per step, of which llmkern._C kernels {kernel / a.steps * 1e3:.2f} ms "
          f"({100 * kernel / total:.0f}%)")
    st.sort_stats("tottime").print_stats(15)
    print(s.getvalue())

    plan = model.__dict__.get("_decode_plan")
    if plan is not None and plan.program is not None:
        _program_profile(model, plan, cache, nxt, a.steps, sids)


def _program_profile(model, plan, cache, nxt, steps: int, sids=None) -> None:
    """(4) The step program's own clock around each launch: time per op per step, no profiler overhead."""
    per_op: dict = {}
    calls: dict = {}
    with torch.inference_mode():
        walls = []
        for _ in range(steps):
            assert plan.matches(model, cache, nxt, sids) and plan.ready()
            t = time.perf_counter()
            _, timings = plan.step_timed(nxt)
            walls.append(time.perf_counter() - t)
            for name, sec in timings:
                per_op[name] = per_op.get(name, 0.0) + sec
        for name, _ in timings:
            calls[name] = calls.get(name, 0) + 1
    wall = statistics.fmean(walls)
    inside = sum(per_op.values()) / steps
    print(f"step program ({steps} steps, its own clock): mean step {wall * 1e3:.2f} ms, launches "
          f"{inside * 1e3:.2f} ms, the rest (Python around the program, plan checks) {(wall - inside) * 1e3:.2f} ms")
    print(f"{'op':18s} {'calls/step':>10s} {'ms/step':>9s} {'share':>6s}")
    for name, sec in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"{name:18s} {calls[name]:10d} {sec / steps * 1e3:9.3f} {100 * sec / steps / wall:5.0f}%")


if __name__ == "__main__":
    main()
