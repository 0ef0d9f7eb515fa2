"""The byte-level BPE tokenizer: pre-tokenizers, BPE merge order, SmolLM2's vocabulary, decoding,
streaming, the chat template, and (when `transformers` is installed) Hugging Face's encodings."""
from __future__ import annotations

import random

import pytest

from llmkern.models import pretokenize as P
from llmkern.models.gguf_loader import read_metadata
from llmkern.models.tokenizer import Tokenizer, bytes_to_unicode, tokenizer_from_gguf_metadata
from llmkern.models.tokenizer_spm import SPMTokenizer

from _tiny_gguf import spm_vocab, write_spm_gguf

TEXTS = [
    "Hello, world!", "What is the capital of France?", "  leading spaces and trailing   ",
    "naïve café — 中文 테스트 🙂🙂 ǅ ß ﬁ", "I'm, you'll, they'd, WE'RE 'S", "line1\nline2\r\n\n\tTabbed\u3000wide",
    "Prices: $1,234.56 on 2024-01-01 ½ ٣٤", "<|im_start|>user\nHi<|im_end|>\n", "def f(x):\n    return x**2  # sq\n",
    "\xa0nbsp and \x85 next-line", "",
]


def random_texts(n, seed):
    rng = random.Random(seed)
    alphabet = list("aZé中 \t\n\r'sStdl0129.,!?-()🙂<|>_\xa0\u3000") + ["<|im_end|>", "<|endoftext|>", "the", " and"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(smollm_reader):
    return Tokenizer.from_gguf_metadata(read_metadata(smollm_reader))


# ------------------------------------------------------------------ pieces


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


@pytest.mark.parametrize("fn,text,want", [
    (P.split_gpt2, "Hello world  foo\n bar's 123 !!", ["Hello", " world", " ", " foo", "\n", " bar", "'s", " 123", " !!"]),
    (P.split_gpt2, "a \tb", ["a", " ", "\t", "b"]),
    (P.split_gpt2, "end   ", ["end", "   "]),
    (P.split_digits_gpt2, "in 2024, x42", ["in", " ", "2", "0", "2", "4", ",", " x", "4", "2"]),
    (P.split_llama3, "Hello 12345 (x)\n\n  y", ["Hello", " ", "123", "45", " (", "x", ")\n\n", " ", " y"]),
    (P.split_llama3, "I'M\tok", ["I", "'M", "\tok"]),
    (P.split_qwen2, "v12", ["v", "1", "2"]),
])
def test_pretokenizers_known_splits(fn, text, want):
    assert fn(text) == want


def test_pretokenizers_match_regex_engine():
    regex = pytest.importorskip("regex", reason="the cross-check against the `regex` engine needs the regex package")
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    l3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
    llama3, qwen2 = regex.compile(l3), regex.compile(l3.replace("{1,3}", ""))
    for s in TEXTS + random_texts(1500, 1):
        assert P.split_gpt2(s) == gpt2.findall(s), repr(s)
        assert P.split_llama3(s) == llama3.findall(s), repr(s)
        assert P.split_qwen2(s) == qwen2.findall(s), repr(s)


def test_bpe_merge_order():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    t = Tokenizer(tokens, ["b c", "a b", "a bc"])  # "b c" has the best rank: a|bc, then abc
    assert t.encode("abc") == [5]
    t = Tokenizer(tokens, ["a b", "b c", "a bc"])  # "a b" first: ab|c, and no "ab c" merge
    assert t.encode("abc") == [3, 2]
    assert t.encode("abab") == [3, 3] and t.encode("cab") == [2, 3]


def test_ignore_merges_for_llama3():
    tokens = ["a", "b", "c", "ab", "abc"]
    assert Tokenizer(tokens, ["a b"], pre="gpt2").encode("abc") == [3, 2]  # no merge reaches "abc"
    assert Tokenizer(tokens, ["a b"], pre="llama-bpe").encode("abc") == [4]  # a whole word that is a token


def test_unsupported_inputs():
    with pytest.raises(ValueError, match="pre-tokenizer 'nope'"):
        Tokenizer(["a"], [], pre="nope")
    with pytest.raises(ValueError, match="tokenizer model 'bert'"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "bert"}, source="x.gguf")
    with pytest.raises(ValueError, match="merge 0"):
        Tokenizer(["a"], ["ab"])
    t = Tokenizer(["a"], [])
    with pytest.raises(TypeError, match="str"):
        t.encode(b"a")
    with pytest.raises(ValueError, match="token id 5"):
        t.decode([5])


# ------------------------------------------------------------------ SmolLM2's vocabulary


def test_smollm2_known_encodings(tok):
    v = tok.vocab
    assert tok.pre == "smollm" and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("Hello world") == [v["Hello"], v["Ġworld"]]
    assert tok.encode("The capital of France") == [v["The"], v["Ġcapital"], v["Ġof"], v["ĠFrance"]]
    assert tok.encode("2024") == [v[c] for c in "2024"]  # digits one by one
    assert tok.encode("<|im_start|>user") == [1, v["user"]]
    assert 1 not in tok.encode("<|im_start|>user", parse_special=False)
    assert tok.encode("x", add_bos=True)[0] == 1


def test_smollm2_round_trip(tok):
    for s in TEXTS + random_texts(300, 2):
        assert tok.decode(tok.encode(s)) == s, repr(s)
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special=True) == "hi"


def test_stream_decoder_reassembles_split_characters(tok):
    for s in TEXTS + ["🙂🙂🙂 中文字符 ﬁ"]:
        ids = tok.encode(s)
        dec = tok.stream_decoder(skip_special=False)
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == s
        assert all("\ufffd" not in p for p in pieces)
    # a 4-byte emoji is several byte-level tokens: nothing comes out until the last one
    ids = tok.encode("🙂")
    assert len(ids) > 1
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_chat_template(tok):
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template("What is 2+2?") == want
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode_chat("Hi")
    assert ids[0] == 1 and ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    # without a template (or jinja2): ChatML
    plain = Tokenizer(tok.tokens, [], tok.token_types)
    assert plain.apply_chat_template(msgs) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        tok.apply_chat_template([{"content": "no role"}])


def test_matches_hugging_face(tok, smollm_path):
    """transformers' tokenizer built from the same GGUF. Its GGUF converter drops SmolLM2's digit
    splitting (the hub's tokenizer.json has Digits(individual_digits=True) before ByteLevel; llama.cpp's
    "smollm" pre-tokenizer does the same), so that pre-tokenizer is restored before comparing."""
    transformers = pytest.importorskip("transformers", reason="cross-check with Hugging Face needs transformers")
    from tokenizers import pre_tokenizers

    hf = transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for s in TEXTS + random_texts(1000, 3):
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False), repr(s)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------ SentencePiece (Llama 2, Mistral)


@pytest.fixture(scope="module")
def spm():
    tokens, scores, types = spm_vocab()
    return SPMTokenizer(tokens, scores, types)


def test_spm_encodings(spm):
    v = spm.vocab
    assert spm.encode("hello the") == [1, v["▁hello"], v["▁the"]]  # bos, prefix space
    assert spm.encode("hello the", add_bos=False) == [v["▁hello"], v["▁the"]]
    assert spm.encode("中", add_bos=False) == [v["▁"]] + [v[f"<0x{b:02X}>"] for b in "中".encode()]  # byte fallback
    # the adjacent pair whose merge has the highest score goes first
    pieces = ["a", "b", "c", "ab", "bc"]
    kw = dict(add_space_prefix=False, add_bos=False)
    assert SPMTokenizer(pieces, [0, 0, 0, -2, -1], **kw).encode("abc") == [0, 4]  # a|bc
    assert SPMTokenizer(pieces, [0, 0, 0, -1, -2], **kw).encode("abc") == [3, 2]  # ab|c
    assert SPMTokenizer(pieces + ["abc"], [0, 0, 0, -1, -2, -3], **kw).encode("abcab") == [5, 3]
    for s in ["hello world", "the abc, 12 é!", "中文 x", "  two  spaces"]:
        assert spm.decode(spm.encode(s)[1:]) == s
        dec = spm.stream_decoder()
        assert "".join([dec.push(i) for i in spm.encode(s)[1:]] + [dec.flush()]) == s


def test_spm_after_special_token_gets_prefix(spm):
    """llama.cpp (and SentencePiece) prefix every text fragment that starts the text or follows a
    special token with a space."""
    v = spm.vocab
    assert spm.encode("hello</s>hello", add_bos=False) == [v["▁hello"], 2, v["▁hello"]]


def test_spm_from_gguf_and_matches_hugging_face(tmp_path):
    path = tmp_path / "spm.gguf"
    write_spm_gguf(path)
    from llmkern.models.gguf_loader import open_gguf
    tok = tokenizer_from_gguf_metadata(read_metadata(open_gguf(path)))
    assert isinstance(tok, SPMTokenizer) and tok.bos_id == 1 and tok.add_bos
    transformers = pytest.importorskip("transformers", reason="cross-check with Hugging Face needs transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    rng = random.Random(4)
    alphabet = list("abcdehlorwté ,!12xyz\n中") + [" hello", " world", "  "]
    texts = ["hello world", "the abc", "12 1 2", "é é"] + \
        ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))) for _ in range(500)]
    for s in texts:
        s = s.lstrip(" ")  # HF's Metaspace does not prefix a text that starts with a space; llama.cpp does
        if s:
            # Segmentation compared without special tokens: whether HF's GGUF conversion adds the BOS differs
            # between transformers versions (5.24 does, 5.17 does not); ours follows the file (add_bos above).
            assert tok.encode(s, add_bos=False) == hf.encode(s, add_special_tokens=False), repr(s)
            assert tok.encode(s) == [1] + tok.encode(s, add_bos=False)
