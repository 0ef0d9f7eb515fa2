"""Byte-level BPE tokenizer (GPT-2 style) built from GGUF metadata, in pure Python.

GGUF keys read: tokenizer.ggml.model ("gpt2"), .tokens, .merges, .token_type, .pre (pre-tokenizer
name), .bos_token_id, .eos_token_id, .eot_token_id, .add_bos_token, and tokenizer.chat_template.

Encoding, as Hugging Face `tokenizers` does it for these models:
1. special tokens (token type CONTROL or USER_DEFINED, e.g. "<|im_start|>") are cut out of the text
   first and map to their ids directly;
2. the rest is pre-tokenized into words (pretokenize.py: digit splitting for "smollm", then the GPT-2
   pattern, or the Llama 3 / Qwen2 pattern);
3. each word's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`), and adjacent
   symbols are merged by merge rank (lowest first) until no ranked pair is left; results are cached
   per word.
Decoding maps the characters back to bytes and decodes UTF-8; `StreamDecoder` does it incrementally,
holding back a split multi-byte character until it is complete.
"""
from __future__ import annotations

import re

from .pretokenize import pretokenizer_for

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6



def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (control chars, space, ...) map to
    256, 257, ... in order, so that "Ġ" (256 + 32) stands for a space.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


IGNORE_MERGES_PRE = ("llama-bpe", "llama3", "smaug-bpe")
_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


class Tokenizer:
    """Byte-level BPE tokenizer.

    tokens: the vocabulary (id -> token string in the byte-mapped alphabet);
    merges: "left right" strings, earlier = higher priority; token_types: GGUF token type per id.
    """

    def __init__(self, tokens, merges, token_types=None, *, pre="gpt2", bos_id=None, eos_id=None,
                 eot_id=None, unk_id=None, add_bos=False, chat_template=None, name="tokenizer"):
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.token_types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * len(self.tokens)
        if len(self.token_types) != len(self.tokens):
            raise ValueError(f"{name}: {len(self.token_types)} token types for {len(self.tokens)} tokens")
        self.ranks = {}
        for rank, m in enumerate(merges):
            left, sep, right = m.partition(" ")
            if not sep:
                raise ValueError(f"{name}: merge {rank} ({m!r}) is not 'left right'")
            self.ranks.setdefault((left, right), rank)
        self.pre = pre
        self._pretokenize = pretokenizer_for(pre)
        # Llama 3's tokenizer takes a word that is itself a token whole, before any merge (HF's
        # ignore_merges, llama.cpp's LLAMA3 pre-type); the merges alone could split it differently.
        self.ignore_merges = pre in IGNORE_MERGES_PRE
        self.bos_id, self.eos_id, self.eot_id, self.unk_id = bos_id, eos_id, eot_id, unk_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.name = name
        # Special tokens are matched in raw text, longest first (so "<|im_start|>" beats a prefix of it).
        self.special_ids = {i for i, t in enumerate(self.token_types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
        specials = sorted((self.tokens[i] for i in self.special_ids if self.tokens[i]), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gguf_metadata(cls, meta: dict, *, source: str = "GGUF file") -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer model {model!r} is not supported (llmkern reads byte-level "
                             f"BPE, 'gpt2', and SentencePiece BPE, 'llama')")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise ValueError(f"{source}: metadata key {key!r} is missing")

        def opt(key):
            v = meta.get(key)
            return None if v is None else int(v)

        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.token_type"),
                   pre=meta.get("tokenizer.ggml.pre", "gpt2"), bos_id=opt("tokenizer.ggml.bos_token_id"),
                   eos_id=opt("tokenizer.ggml.eos_token_id"), eot_id=opt("tokenizer.ggml.eot_token_id"),
                   unk_id=opt("tokenizer.ggml.unknown_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), name=source)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer of a GGUF file: byte-level BPE ("gpt2") or SentencePiece BPE ("llama")."""
        from .gguf_loader import open_gguf, read_metadata

        reader = open_gguf(path)
        return tokenizer_from_gguf_metadata(read_metadata(reader), source=str(path))

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def stop_ids(self) -> frozenset:
        """Ids that end a generation: EOS and end-of-turn."""
        return frozenset(i for i in (self.eos_id, self.eot_id) if i is not None)

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """text -> token ids. parse_special: map special-token strings in text to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"{self.name}: encode() takes a str, got {type(text).__name__}")
        ids = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        pos = 0
        if parse_special and self._special_re is not None:
            for m in self._special_re.finditer(text):
                self._encode_ordinary(text[pos:m.start()], ids)
                ids.append(self.vocab[m.group()])
                pos = m.end()
        self._encode_ordinary(text[pos:], ids)
        return ids

    def _encode_ordinary(self, text: str, out: list) -> None:
        if not text:
            return
        cache = self._cache
        for word in self._pretokenize(text):
            hit = cache.get(word)
            if hit is None:
                hit = self._bpe(word)
                if len(cache) < 100_000:  # bounded: a long adversarial text cannot grow it forever
                    cache[word] = hit
            out.extend(hit)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One pre-tokenized word -> ids: merge the lowest-ranked adjacent pair until none is ranked."""
        symbols = [_BYTE_ENCODER[b] for b in word.encode("utf-8")]
        if self.ignore_merges:
            whole = self.vocab.get("".join(symbols))
            if whole is not None:
                return (whole,)
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i, n = [], 0, len(symbols)
            while i < n:  # merge every occurrence of the best pair, left to right
                if i < n - 1 and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = []
        for s in symbols:
            i = self.vocab.get(s)
            if i is None:
                # only possible with a vocabulary that lacks some byte symbols: fall back per byte
                for ch in s:
                    j = self.vocab.get(ch, self.unk_id)
                    if j is None:
                        raise ValueError(f"{self.name}: symbol {ch!r} is not in the vocabulary and there is no unk token")
                    ids.append(j)
            else:
                ids.append(i)
        return tuple(ids)

    # ------------------------------------------------------------------ decode

    def token_bytes(self, token_id: int, *, skip_special: bool = False) -> bytes:
        """The bytes one token stands for (special tokens: their text, or b"" with skip_special)."""
        if not 0 <= token_id < len(self.tokens):
            raise ValueError(f"{self.name}: token id {token_id} is outside the vocabulary (0..{len(self.tokens) - 1})")
        tok = self.tokens[token_id]
        if token_id in self.special_ids:
            return b"" if skip_special else tok.encode("utf-8")
        try:
            return bytes(_BYTE_DECODER[c] for c in tok)
        except KeyError:  # a token outside the byte alphabet (user-added): its own text
            return tok.encode("utf-8")

    def decode(self, ids, *, skip_special: bool = False) -> str:
        data = b"".join(self.token_bytes(int(i), skip_special=skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special, strip_leading_space=self.strip_leading_space)

    strip_leading_space = False  # SentencePiece: the space its prefix adds is not part of the text

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        """messages: a str (one user turn) or [{"role", "content"}, ...] -> the prompt text.

        Renders the GGUF's Jinja template with jinja2 (sandboxed, as transformers does); without
        jinja2 or a template, falls back to ChatML (what SmolLM2's template produces, minus its
        default system prompt which the template adds itself).
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"apply_chat_template: messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if self.chat_template:
            try:
                import jinja2.sandbox
            except ImportError:
                jinja2 = None
            if jinja2 is not None:
                return _render_jinja(self.chat_template, messages, add_generation_prompt,
                                     self._token_text(self.bos_id), self._token_text(self.eos_id))
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages, *, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def _token_text(self, i):
        return "" if i is None or not 0 <= i < len(self.tokens) else self.tokens[i]


def _render_jinja(template: str, messages, add_generation_prompt: bool, bos: str, eos: str) -> str:
    import jinja2
    import jinja2.sandbox

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    # trim_blocks / lstrip_blocks as transformers renders chat templates
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos)


class StreamDecoder:
    """Incremental decoding: push(token_id) -> the text that is now complete ("" while a UTF-8
    character is split across tokens)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True, strip_leading_space: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._pending = b""
        self._strip = strip_leading_space  # until the first text comes out

    def push(self, token_id: int) -> str:
        data = self._pending + self.tokenizer.token_bytes(int(token_id), skip_special=self.skip_special)
        # hold back an incomplete trailing UTF-8 sequence (at most 3 bytes of a 4-byte character)
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            b = data[-back]
            if b & 0xC0 == 0x80:      # continuation byte: keep looking for the lead byte
                continue
            if b >= 0xC0:             # lead byte: complete iff enough continuation bytes follow
                need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
                if need > back:
                    cut = len(data) - back
            break
        self._pending = data[cut:]
        return self._out(data[:cut])

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return self._out(data)

    def _out(self, data: bytes) -> str:
        if self._strip and data:
            self._strip = False
            if data.startswith(b" "):
                data = data[1:]
        return data.decode("utf-8", errors="replace")


def tokenizer_from_gguf_metadata(meta: dict, *, source: str = "GGUF file") -> Tokenizer:
    """Byte-level BPE (tokenizer.ggml.model "gpt2") or SentencePiece BPE ("llama": Llama 2, Mistral)."""
    if meta.get("tokenizer.ggml.model") == "llama":
        from .tokenizer_spm import SPMTokenizer
        return SPMTokenizer.from_gguf_metadata(meta, source=source)
    return Tokenizer.from_gguf_metadata(meta, source=source)
