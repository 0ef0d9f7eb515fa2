"""generate(): sampling, stopping, streaming, batches == each prompt alone, the real SmolLM2, the CLI."""
from __future__ import annotations

import pytest
import torch

from _tiny_gguf import MERGES, tiny_vocab, write_tiny_gguf
from llmkern.models import Llama, ModelConfig, Tokenizer, generate
from llmkern.models.cli_generate import main as cli_main
from llmkern.models.generate import sample


@pytest.fixture(scope="module")
def tiny():
    tokens, types = tiny_vocab()
    tok = Tokenizer(tokens, MERGES, types, pre="smollm", bos_id=0, eos_id=2)
    cfg = ModelConfig(vocab_size=len(tokens), hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=160, max_positions=128, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    m = Llama(cfg, backend="reference").eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
        m.lm_head.weight.mul_(4)  # peaked logits: greedy choices far from ties
    return m, tok


PROMPTS = [[5, 70, 9, 33, 100], [41], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


# ------------------------------------------------------------------ sampling


def test_sample_greedy_topk_topp():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    top = logits.argmax(-1)
    assert torch.equal(sample(logits), top)
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    assert torch.equal(sample(logits, 1.0, top_k=1, generators=g), top)
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generators=g), top)
    top3 = logits.topk(3, -1).indices
    for _ in range(50):
        s = sample(logits, 2.0, top_k=3, generators=g)
        assert all(s[b] in top3[b] for b in range(4))
    # seeded: reproducible
    a = [sample(logits, 1.0, generators=[torch.Generator().manual_seed(7)] * 4) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_sample_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = [torch.Generator().manual_seed(0)]
    n = 4000
    counts = torch.bincount(torch.cat([sample(logits, 1.0, generators=g) for _ in range(n)]), minlength=4)
    p = logits.softmax(-1)[0]
    sigma = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() < 4 * sigma).all(), (counts / n, p)
    # top_p=0.8 keeps the smallest prefix reaching 0.8: tokens 0 and 1 (0.64 + 0.24)
    counts = torch.bincount(torch.cat([sample(logits, 1.0, top_p=0.8, generators=g) for _ in range(500)]),
                            minlength=4)
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0


# ------------------------------------------------------------------ tiny model


@pytest.mark.parametrize("paged, block_size", [(True, 4), (True, None), (False, None)])  # None: the default (64)
def test_batch_equals_each_alone(tiny, paged, block_size):
    m, tok = tiny
    batch = generate(m, tok, PROMPTS, max_new_tokens=6, chat=False, paged=paged, block_size=block_size)
    assert batch.stats["paged"] == paged and batch.stats["batch_size"] == 3
    for b, p in enumerate(PROMPTS):
        alone = generate(m, tok, [p], max_new_tokens=6, chat=False)
        assert not alone.stats["paged"]
        assert batch.tokens[b] == alone.tokens[0], b
        assert batch.texts[b] == alone.texts[0]
        assert batch.prompt_tokens[b] == p


def test_sampling_batch_row0_equals_alone_and_seed_repeats(tiny):
    m, tok = tiny
    kw = dict(max_new_tokens=5, chat=False, temperature=1.5, top_k=20, top_p=0.95, seed=3)
    batch = generate(m, tok, PROMPTS, **kw)
    assert generate(m, tok, [PROMPTS[0]], **kw).tokens[0] == batch.tokens[0]  # one generator per prompt
    assert generate(m, tok, PROMPTS, **kw).tokens == batch.tokens


def test_stop_and_length(tiny):
    m, tok = tiny
    first = generate(m, tok, [PROMPTS[0]], max_new_tokens=4, chat=False)
    assert first.finish_reasons == ["length"] and len(first.tokens[0]) == 4
    stopped = generate(m, tok, PROMPTS, max_new_tokens=4, chat=False, stop_ids={first.tokens[0][2]})
    assert stopped.tokens[0] == first.tokens[0][:2] and stopped.finish_reasons[0] == "stop"
    s = stopped.stats
    assert s["prefill_tokens"] == sum(map(len, PROMPTS))
    # every sampled token after the prefill's first one came from a decode step (stop tokens included)
    made = [len(t) + (r == "stop") - 1 for t, r in zip(stopped.tokens, stopped.finish_reasons)]
    assert s["decode_tokens"] == sum(made) and s["decode_steps"] == max(made)


def test_streaming_and_text_prompts(tiny):
    m, tok = tiny
    got = {}
    res = generate(m, tok, ["the thin", "hi"], max_new_tokens=5, chat=False,
                   stream=lambda i, t: got.setdefault(i, []).append(t))
    assert res.prompt_tokens[0] == tok.encode("the thin")
    for i in range(2):
        assert "".join(got.get(i, [])) == res.texts[i] == tok.decode(res.tokens[i], skip_special=True)
    chat = generate(m, tok, "hi", max_new_tokens=2)  # ChatML of the tiny tokenizer's specials
    assert chat.prompt_tokens[0] == tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_int8_kv_cache_runs(tiny):
    m, tok = tiny
    res = generate(m, tok, PROMPTS, max_new_tokens=3, chat=False, kv_int8=True)
    assert [len(t) for t in res.tokens] == [3, 3, 3]


def test_errors(tiny):
    m, tok = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, tok, "x", max_new_tokens=0)
    with pytest.raises(ValueError, match="context of 128"):
        generate(m, tok, [list(range(3, 103))], max_new_tokens=40, chat=False)
    with pytest.raises(ValueError, match="empty"):
        generate(m, tok, [])
    with pytest.raises(ValueError, match="top_p"):
        generate(m, tok, "x", top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be finite"):
        generate(m, tok, "x", temperature=float("nan"))
    V = m.config.vocab_size
    for bad in ([3, V], [-1, 3]):  # (an IndexError from inside the embedding before)
        with pytest.raises(ValueError, match=rf"prompt 0 has token ids .*outside the vocabulary \(0..{V - 1}\)"):
            generate(m, tok, [bad], chat=False)
    with pytest.raises(ValueError, match=rf"tokens must be in 0..{V - 1}"):
        m(torch.tensor([[3, V]]))
    cache = m.new_cache(1, 16)
    with pytest.raises(ValueError, match="last_only needs every length >= 1"):
        m(torch.tensor([[3, 4]]), cache, lengths=torch.tensor([0]), last_only=True)


def test_tiny_temperature_samples_without_nan(tiny):
    """temperature 1e-40 overflowed logits / temperature to inf (NaN probabilities); now the draw is greedy."""
    from llmkern.models.generate import sample

    logits = torch.tensor([[1.0, 3.0, 2.0], [50.0, -1.0, 49.0]])
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert sample(logits, 1e-40, generators=g).tolist() == [1, 0]
    m, tok = tiny
    greedy = generate(m, tok, "x", max_new_tokens=4).tokens
    assert generate(m, tok, "x", max_new_tokens=4, temperature=1e-40, seed=3).tokens == greedy


# ------------------------------------------------------------------ the real model


def test_smollm2_knows_paris(smollm, capsys):
    model, tok = smollm
    pieces = []
    res = generate(model, tok, "What is the capital of France?", max_new_tokens=12,
                   stream=lambda i, t: pieces.append(t))
    assert "Paris" in res.text, res.text
    assert "".join(pieces) == res.text
    s = res.stats
    assert s["prefill_tokens"] == len(res.prompt_tokens[0]) > 30 and s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0
    with capsys.disabled():
        print(f"\n[SmolLM2 greedy] {res.text!r}\n[SmolLM2 speed] {res.summary()}")


# ------------------------------------------------------------------ CLI


@pytest.mark.parametrize("act_int8", [False, True])
def test_cli_prepares_the_linears_at_load_on_the_cpu(tmp_path, capsys, monkeypatch, act_int8):
    """On the CPU `llmkern generate` loads with prepare=True: every quantized linear is prepared before the first
    prompt (lower peak memory, no packing in the first prefill), once, in the mode it runs: --act-int8's modes
    (W4A8g, W8A8 in the layers; the lm_head weight-only) are set as the loader builds each linear (load_gguf's
    `modes`), not after the load."""
    import importlib

    import llmkern.nn as lnn
    from llmkern.nn.linear import _QuantizedBase

    gen = importlib.import_module("llmkern.models.generate")  # (the package re-exports the function by that name)
    gl = importlib.import_module("llmkern.models.gguf_loader")

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    seen = {"trusted": []}
    real_load, real_generate, real_trust = gl.load_gguf, gen.generate, _QuantizedBase._trust

    def load(*a, **kw):
        seen["prepare"] = kw.get("prepare")
        return real_load(*a, **kw)

    def generate(model, *a, **kw):
        seen["linears"] = [m for m in model.modules() if isinstance(m, (lnn.Int8Linear, lnn.Int4Linear))]
        seen["prepared"] = [m.__dict__["_run"] is not None for m in seen["linears"]]
        seen["modes"] = {(type(m).__name__, m.mode) for m in seen["linears"] if m is not model.lm_head}
        seen["head_mode"] = getattr(model.lm_head, "mode", None)
        seen["at_generate"] = len(seen["trusted"])
        return real_generate(model, *a, **kw)

    def trust(self, *a, **kw):
        seen["trusted"].append(id(self))
        return real_trust(self, *a, **kw)

    monkeypatch.setattr(gl, "load_gguf", load)
    monkeypatch.setattr(gen, "generate", generate)
    monkeypatch.setattr(_QuantizedBase, "_trust", trust)
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    rc = cli_main(["generate", "the", "--model", str(path), "--quant", "int4", "--max-new-tokens", "2", "--no-chat",
                   "--no-bandwidth", "--quiet", "--threads", "1", *(["--act-int8"] if act_int8 else [])])
    out, err = capsys.readouterr()
    assert rc == 0 and out.endswith("\n"), err
    assert seen["prepare"] is True and seen["prepared"] and all(seen["prepared"])
    want = {"Int4Linear": "w4a8g", "Int8Linear": "w8a8"} if act_int8 else {"Int4Linear": "w4a16", "Int8Linear": "w8a16"}
    assert ("Int4Linear", want["Int4Linear"]) in seen["modes"] and all(want[k] == v for k, v in seen["modes"]), seen["modes"]
    assert seen["head_mode"] in (None, "w4a16", "w8a16")  # (the lm_head stays weight-only: act_int8_modes)
    # each linear prepared once, all at load (none again in the prompt's calls)
    assert sorted(seen["trusted"]) == sorted(id(m) for m in seen["linears"]) and seen["at_generate"] == len(seen["trusted"])


def test_act_int8_modes_per_device():
    """--act-int8's modes: W4A8g and W8A8 on the CPU; on a GPU W8A8 alone (no W4A8 kernel there: its int4 linears
    would run the reference backend)."""
    from llmkern.models.cli_generate import act_int8_modes
    assert act_int8_modes(torch.device("cpu")) == {"int4": "w4a8g", "int8": "w8a8", "lm_head": {}}
    assert act_int8_modes(torch.device("cuda", 0)) == {"int8": "w8a8", "lm_head": {}}


def test_cli_tiny_model(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    rc = cli_main(["generate", "the", "thin", "--model", str(path), "--max-new-tokens", "3", "--no-chat",
                   "--backend", "reference", "--no-bandwidth", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.endswith("\n")
    assert "prefill" in err and "decode" in err and "tok/s" in err and "loaded tiny.gguf" in err
    rc = cli_main(["generate", "a", "--extra-prompt", "b", "--model", str(path), "--max-new-tokens", "2", "--quiet",
                   "--no-bandwidth", "--temperature", "0.7", "--seed", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and "[0] a" in out and "[1] b" in out and "loading" not in err


def test_cli_dtype(tmp_path, capsys, monkeypatch):
    import torch

    import llmkern.models.cli_generate as cg
    from llmkern import _backends

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    for name, flag in (("float32", []), ("float32", ["--dtype", "float32"]), ("bfloat16", ["--dtype", "bfloat16"])):
        rc = cli_main(["generate", "the", "--model", str(path), "--max-new-tokens", "3", "--no-chat", "--quiet",
                       "--no-bandwidth", *flag])
        out, err = capsys.readouterr()
        assert rc == 0 and out.endswith("\n") and f"({name} activations)" in err, err  # (no flag: float32)
    # auto: bf16 only for the cpu backend with AVX-512 kernels and fast bf16 dot products
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    monkeypatch.delenv("LLMKERN_CPU_ISA", raising=False)
    has = {"v": True}
    monkeypatch.setattr(_backends, "cpu_bf16_dot_fast", lambda: has["v"])
    monkeypatch.setattr(_backends, "cpu_isa", lambda: "avx512_vnni")
    assert cg.pick_dtype("auto", None) is torch.bfloat16 and cg.pick_dtype("auto", "cpu") is torch.bfloat16
    assert cg.pick_dtype("auto", "reference", "cuda") is torch.bfloat16  # GPU kernels are 16-bit first
    assert cg.pick_dtype("auto", "reference") is torch.float32 and cg.pick_dtype("float32", None) is torch.float32
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    assert cg.pick_dtype("auto", None) is torch.float32
    monkeypatch.delenv("LLMKERN_BACKEND")
    has["v"] = False
    assert cg.pick_dtype("auto", None) is torch.float32
    has["v"] = True
    monkeypatch.setattr(_backends, "cpu_isa", lambda: "avx2")
    assert cg.pick_dtype("auto", None) is torch.float32


def test_bf16_dot_speed_probe(monkeypatch):
    """`--dtype auto`'s probe: vdpbf16ps' issue rate over the FMA rate, measured (0.0 without AVX512-BF16), and
    bf16 counted fast from 0.5 of it (AMD Zen 4 / 5 ~1; an Intel Xeon here 0.24-0.26, where bf16 ran slower)."""
    from llmkern import _backends

    C = _backends.cpu_module()
    if C is None:
        pytest.skip("llmkern._C not built")
    r = C.bf16_dot_rate_ratio()
    if _backends.cpu_has("avx512_bf16"):
        assert 0.05 < r < 4.0, r  # a measured rate ratio, not a flag
    else:
        assert r == 0.0
    try:
        for ratio, fast in ((0.3, False), (0.5, True), (0.9, True)):
            _backends.cpu_bf16_dot_fast.cache_clear()
            monkeypatch.setattr(_backends, "cpu_has", lambda f: True)
            monkeypatch.setattr(_backends, "cpu_module", lambda r=ratio: type("M", (), {
                "bf16_dot_rate_ratio": staticmethod(lambda: r)}))
            assert _backends.cpu_bf16_dot_fast() is fast, ratio
        _backends.cpu_bf16_dot_fast.cache_clear()
        monkeypatch.setattr(_backends, "cpu_has", lambda f: False)
        assert _backends.cpu_bf16_dot_fast() is False  # no AVX512-BF16: not measured at all
    finally:
        monkeypatch.undo()
        _backends.cpu_bf16_dot_fast.cache_clear()


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["generate", "hi", "--model", str(tmp_path / "none.gguf")]) == 1
    assert "error: GGUF file not found" in capsys.readouterr().err
    for dev, msg in (("tpu", "--device must be cpu, cuda or cuda:N, got 'tpu'"), ("cuda:x", "--device must be"),
                     ("cuda:99", "CUDA GPU")):
        assert cli_main(["generate", "hi", "--device", dev]) == 1
        assert msg in capsys.readouterr().err, dev
    assert cli_main(["generate", "hi", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens" in capsys.readouterr().err
    for args, msg in ((["--seed", str(10 ** 20)], "--seed must be in [0, 2^63 - 64)"),
                      (["--temperature", "nan"], "--temperature must be finite")):
        assert cli_main(["generate", "hi", *args]) == 1
        assert msg in capsys.readouterr().err, args
    threads = torch.get_num_threads()
    for n in ("0", "100000"):  # (torch.set_num_threads(100000) crashes the process: refused before it)
        assert cli_main(["generate", "hi", "--threads", n]) == 1
        assert f"--threads must be in [1, 1024], got {n}" in capsys.readouterr().err
    assert torch.get_num_threads() == threads
