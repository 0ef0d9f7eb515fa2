"""llmkern's Llama runtime on a GPU (skipped without one): a tiny model with int4 linears (Int4Linear's prepared
CUDA call: the packed kernels) and bf16 activations, moved to CUDA; generate() there gives a batch the same tokens
as each prompt alone, paged caches the same as contiguous ones, logits close to the same model on the CPU, with
the cuda / triton backends (not the reference) doing the work; the real SmolLM2 answers "Paris" when its
package is installed. scripts/gpu_check.sh runs this file in its generic stage (2)."""
from __future__ import annotations

import pytest
import torch

from _tiny_gguf import MERGES, tiny_vocab
from llmkern import ops
from llmkern.models import Llama, ModelConfig, Tokenizer, generate
from llmkern.nn import quantize_linears

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 70, 9, 33, 100], [41], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
GPU_OPS = ("int4_linear", "rms_norm", "attention", "decode_attention", "kv_cache_append")


@pytest.fixture(scope="module")
def tiny_pair():
    """(CPU model fp32, the same weights on CUDA in bf16, tokenizer): 2 layers, GQA 4 / 2 heads, D = 64, int4 G32."""
    tokens, types = tiny_vocab()
    tok = Tokenizer(tokens, MERGES, types, pre="smollm", bos_id=0, eos_id=2)
    cfg = ModelConfig(vocab_size=len(tokens), hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=160, max_positions=128, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    m = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
        m.lm_head.weight.mul_(4)  # peaked logits: greedy choices far from ties
    quantize_linears(m, "int4", skip=("lm_head",))
    gpu = Llama(cfg, device="cuda", dtype=torch.bfloat16).eval()
    quantize_linears(gpu, "int4", skip=("lm_head",))
    gpu.load_state_dict(m.state_dict())
    return m, gpu, tok


def test_batch_paged_and_alone_agree_on_gpu(tiny_pair):
    _, gpu, tok = tiny_pair
    batch = generate(gpu, tok, PROMPTS, max_new_tokens=6, chat=False)
    assert batch.stats["paged"]
    for name in GPU_OPS:
        assert ops.OPS[name].last_backend in ("cuda", "triton"), (name, ops.OPS[name].last_backend)
    contiguous = generate(gpu, tok, PROMPTS, max_new_tokens=6, chat=False, paged=False)
    assert contiguous.tokens == batch.tokens
    for b, p in enumerate(PROMPTS):
        assert generate(gpu, tok, [p], max_new_tokens=6, chat=False).tokens[0] == batch.tokens[b], b


def test_gpu_logits_match_cpu(tiny_pair):
    """The prefill's last logits on the GPU (bf16 activations, cuda kernels) against the CPU model (fp32)."""
    cpu, gpu, _ = tiny_pair
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref = cpu(ids)[:, -1].double()
        out = gpu(ids.cuda())[:, -1].double().cpu()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err <= 3e-2, err  # bf16 activations through 2 layers (DESIGN's 1e-2 per op)
    assert out.argmax(-1).item() == ref.argmax(-1).item()


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_gpu_decode_step_never_waits_for_the_gpu(tiny_pair, paged):
    """A decode step of the runtime (paged caches: generate's default) issues no synchronizing CUDA call
    (torch.cuda.set_sync_debug_mode("error") raises on one): no op check reads values back, and the caches'
    host-built slots, tables and lengths go to the GPU asynchronously from pinned memory."""
    _, gpu, _ = tiny_pair
    tokens = torch.tensor([[5, 70, 9], [41, 7, 8]], device="cuda")
    if paged:
        cache = gpu.new_cache(paged=True, block_size=16, num_blocks=8)
        ids = [[c.add_sequence() for _ in range(2)] for c in cache][0]
    else:
        cache, ids = gpu.new_cache(2, 32), None
    with torch.no_grad():
        nxt = gpu(tokens, cache, seq_ids=ids, last_only=True).argmax(-1)  # prefill (may synchronize)
        gpu(nxt.view(-1, 1), cache, seq_ids=ids, last_only=True)  # a first step: kernels prepared, compiled
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = gpu(nxt.view(-1, 1), cache, seq_ids=ids, last_only=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (2, gpu.config.vocab_size) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_gpu_prefill_never_waits_for_the_gpu(tiny_pair, paged):
    """A fresh prefill (after a first one prepared the kernels) issues no synchronizing CUDA call either: its
    rotary positions 0..S-1 are checked against the table on the host (values_vouched), not read back."""
    _, gpu, _ = tiny_pair
    tokens = torch.tensor([[5, 70, 9, 4], [41, 7, 8, 6]], device="cuda")

    def fresh():
        if paged:
            cache = gpu.new_cache(paged=True, block_size=16, num_blocks=8)
            return cache, [[c.add_sequence() for _ in range(2)] for c in cache][0]
        return gpu.new_cache(2, 32), None

    with torch.no_grad():
        cache, ids = fresh()
        gpu(tokens, cache, seq_ids=ids, last_only=True)
        cache, ids = fresh()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = gpu(tokens, cache, seq_ids=ids, last_only=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (2, gpu.config.vocab_size) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("kv_int8", [False, True], ids=["bf16_kv", "int8_kv"])
def test_eager_gpu_decode_is_deterministic(tiny_pair, kv_int8):
    """Two identical runs of prefill + decode steps give the same bits (every kernel on the path reduces in a fixed
    order: no atomics): what the graph tests below rely on, checked on its own so that a race shows here."""
    _, gpu, _ = tiny_pair
    prompt = torch.tensor([[5, 70, 9, 4], [41, 7, 8, 6]], device="cuda")
    runs = []
    with torch.inference_mode():
        for _ in range(2):
            cache = gpu.new_cache(2, 12, int8=kv_int8)
            outs = [gpu(prompt, cache, last_only=True)]
            for _ in range(7):
                outs.append(gpu(outs[-1].argmax(-1).view(-1, 1), cache, last_only=True))
            runs.append((outs, cache))
    for i, (a, b) in enumerate(zip(runs[0][0], runs[1][0])):
        assert torch.equal(a, b), f"step {i} (0: prefill): max |run 1 - run 2| {(a - b).abs().max().item():.3g}"
    for i, (a, b) in enumerate(zip(runs[0][1], runs[1][1])):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v), f"layer {i}'s cache differs between the runs"


@pytest.mark.parametrize("kv_int8", [False, True], ids=["bf16_kv", "int8_kv"])
def test_cuda_graph_decode_equals_eager_steps(tiny_pair, kv_int8):
    """The decode step captured as a CUDA graph (models/cuda_graph.py) replays the eager step's kernels on the
    same pointers: bit for bit the eager logits and cache contents, step after step, a copy each time; the
    capture itself changes nothing; a full cache declines (None) and the eager step raises."""
    from llmkern.models.cuda_graph import GraphedDecodeStep

    _, gpu, _ = tiny_pair
    prompt = torch.tensor([[5, 70, 9, 4], [41, 7, 8, 6]], device="cuda")
    with torch.inference_mode():
        caches = [gpu.new_cache(2, 12, int8=kv_int8) for _ in range(2)]
        outs = [[gpu(prompt, c, last_only=True)] for c in caches]
        for out, c in zip(outs, caches):
            for _ in range(2):
                out.append(gpu(out[-1].argmax(-1).view(-1, 1), c, last_only=True))
        before = [(kv.k.clone(), kv.v.clone()) for kv in caches[1]]
        # ("cuda" without an index: the step and the scratch caches of its warm-up take the current GPU's)
        step = GraphedDecodeStep(gpu, caches[1], 2, "cuda").capture()
        for i, (kv, (k, v)) in enumerate(zip(caches[1], before)):
            assert torch.equal(kv.k, k) and torch.equal(kv.v, v), f"the capture changed layer {i}'s cache"
        for _ in range(6):
            outs[0].append(gpu(outs[0][-1].argmax(-1).view(-1, 1), caches[0], last_only=True))
            outs[1].append(step(outs[1][-1].argmax(-1)))
        # Both compared before either is asserted: caches equal but logits not points at the last layers (the
        # final norm, lm_head's cuBLAS GEMM), caches that differ at a layer point at that layer's kernels.
        logits = [(a.float() - b.float()).abs().max().item() for a, b in zip(*outs)]
        layers = [max((a.k.float() - b.k.float()).abs().max().item(), (a.v.float() - b.v.float()).abs().max().item())
                  for a, b in zip(*caches)]
        what = f"max |eager - graphed|: logits by step (0: prefill) {logits}, K / V caches by layer {layers}"
        assert not any(logits) and not any(layers), what
        for a, b in zip(*caches):
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.seq_lens, b.seq_lens), what
            assert a._host_max == b._host_max == 12
        assert step(outs[1][-1].argmax(-1)) is None
        with pytest.raises(ValueError, match="KV cache full"):
            gpu(outs[1][-1].argmax(-1).view(-1, 1), caches[1], last_only=True)


def test_paged_cuda_graph_decode_equals_eager_steps(tiny_pair):
    """Over paged caches (16-token blocks, steps crossing into new ones): the graph reads the step tensors that
    PagedSteps refreshes before each replay (one asynchronous copy each); bit for bit the eager steps."""
    from llmkern.models.cuda_graph import GraphedDecodeStep

    _, gpu, _ = tiny_pair
    prompts = [[5, 70, 9, 4, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [41, 7]]
    with torch.inference_mode():
        runs = []
        for _ in range(2):
            caches = gpu.new_cache(paged=True, block_size=16, num_blocks=8)
            ids = [[c.add_sequence() for _ in prompts] for c in caches][0]
            out = torch.cat([gpu(torch.tensor([p], device="cuda"), caches, seq_ids=[i], last_only=True)
                             for i, p in zip(ids, prompts)])
            runs.append((caches, ids, [out, gpu(out.argmax(-1).view(-1, 1), caches, seq_ids=ids, last_only=True)]))
        step = GraphedDecodeStep(gpu, runs[1][0], 2, "cuda", seq_ids=runs[1][1]).capture()
        for _ in range(6):
            (c0, i0, o0), (c1, i1, o1) = runs
            o0.append(gpu(o0[-1].argmax(-1).view(-1, 1), c0, seq_ids=i0, last_only=True))
            o1.append(step(o1[-1].argmax(-1)))
        for i, (a, b) in enumerate(zip(runs[0][2], runs[1][2])):
            assert torch.equal(a, b), f"step {i} (0: prefill): max |eager - graphed| {(a - b).abs().max().item():.3g}"
        (c0, i0, _), (c1, i1, _) = runs
        for n, (a, b) in enumerate(zip(c0, c1)):
            assert [a._seqs[i].blocks for i in i0] == [b._seqs[i].blocks for i in i1]
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v), f"layer {n}'s cache differs"


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_generate_with_cuda_graph_on_gpu(tiny_pair, paged):
    _, gpu, tok = tiny_pair
    prompts = [PROMPTS[0]] if not paged else PROMPTS
    eager = generate(gpu, tok, prompts, max_new_tokens=8, chat=False, stop_ids=[], paged=paged)
    graphed = generate(gpu, tok, prompts, max_new_tokens=8, chat=False, cuda_graph=True, stop_ids=[], paged=paged)
    assert graphed.stats["cuda_graph"] and not eager.stats["cuda_graph"]
    assert graphed.tokens == eager.tokens


def test_cli_on_gpu(tmp_path, capsys):
    """`llmkern generate --device cuda` on a tiny GGUF: bf16 with --dtype auto, the answer streamed."""
    from _tiny_gguf import write_tiny_gguf
    from llmkern.models.cli_generate import main as cli_main

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    rc = cli_main(["generate", "the", "thin", "--model", str(path), "--max-new-tokens", "4", "--no-chat",
                   "--device", "cuda", "--dtype", "auto", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.endswith("\n") and "(bfloat16 activations)" in err, err


def test_smollm2_on_gpu_knows_paris(smollm_path):
    from llmkern.models import load_gguf

    model, tok = load_gguf(smollm_path, progress=False)
    model = model.to("cuda")
    res = generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in res.text, res.text
    assert ops.OPS["int4_linear"].last_backend in ("cuda", "triton")
