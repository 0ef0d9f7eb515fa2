"""Prefill time, interleaved: llmkern from two trees (PYTHONPATHs) and llama.cpp, same GGUF files and prompt ids.

python prefill_ab.py TREE_A TREE_B N_TOKENS DTYPE FILE... (DTYPE: float32 / bfloat16). Each measurement is a fresh
process (model load, one warm call, then the best of 3 `generate(max_new_tokens=1)` prefill times); rounds
alternate A, B, llama.cpp so drift of this VM's clocks hits all three alike. Prints the median over rounds.
Needs llama-cpp-python (see ../gguf-kquants/quant.py)."""
import os, statistics, subprocess, sys, tempfile

CHILD = r'''
import sys, time, torch
torch.set_num_threads(2)
kind, f, n, dt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
text = "The history of the city of Paris is long and complicated. " * 200
if kind == "llmkern":
    from llmkern.models import load_gguf, generate
    model, tok = load_gguf(f, progress=False, dtype=getattr(torch, dt))
    ids = tok.encode(text)[:n]
    generate(model, tok, [ids], max_new_tokens=1, stop_ids=[])
    print(min(generate(model, tok, [ids], max_new_tokens=1, stop_ids=[]).stats["prefill_s"] for _ in range(3)) * 1e3)
else:
    import llama_cpp
    from llmkern.models import load_gguf
    _, tok = load_gguf(f, progress=False)
    ids = tok.encode(text)[:n]
    lc = llama_cpp.Llama(model_path=f, n_ctx=2048, n_batch=512, verbose=False, n_threads=2, n_threads_batch=2)
    lc.eval(ids)
    best = 1e9
    for _ in range(3):
        lc.reset(); t0 = time.perf_counter(); lc.eval(ids); best = min(best, time.perf_counter() - t0)
    print(best * 1e3)
'''


def run(kind, tree, f, n, dt):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="2")
    # cwd: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", CHILD + f"\nassert __import__('llmkern').__file__.startswith({tree!r})\n",
                          kind, f, str(n), dt], env=env, capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout
    return float(out.strip().splitlines()[-1])


def main():
    a, b, n, dt, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
    for f in files:
        ta, tb, tl = [], [], []
        for r in range(3):
            ta.append(run("llmkern", a, f, n, dt))
            tb.append(run("llmkern", b, f, n, dt))
            tl.append(run("llama.cpp", a, f, n, dt))
            print(f"  round {r}: A {ta[-1]:.0f} B {tb[-1]:.0f} llama.cpp {tl[-1]:.0f} ms", file=sys.stderr, flush=True)
        ma, mb, ml = statistics.median(ta), statistics.median(tb), statistics.median(tl)
        print(f"{os.path.basename(f)} n={n} {dt}: A {ma:.0f} ms, B {mb:.0f} ms (A/B {mb / ma:.2f}x), "
              f"llama.cpp {ml:.0f} ms (A {ml / ma:.2f}x llama.cpp's speed)", flush=True)


if __name__ == "__main__":
    main()
