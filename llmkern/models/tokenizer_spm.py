"""SentencePiece BPE tokenizer (Llama 2, Mistral GGUF files: tokenizer.ggml.model = "llama"), pure Python.

GGUF keys: tokenizer.ggml.tokens, .scores (one float per token), .token_type (NORMAL, CONTROL,
BYTE for "<0xXX>", ...), .bos/.eos/.unknown_token_id, .add_bos_token, .add_space_prefix.

Encoding, as llama.cpp does it: special tokens are cut out first; every other fragment gets a
leading space when add_space_prefix is set (the fragment starts the text or follows a special
token), spaces become "▁", and the fragment's characters are merged pairwise, always the adjacent
pair whose concatenation is the vocabulary token with the highest score (the leftmost on ties),
until no concatenation is a token. A character that is not a token becomes its UTF-8 bytes'
"<0xXX>" tokens (byte fallback), or unk.
Decoding maps "▁" back to spaces and byte tokens to bytes, and drops the prefix space.
"""
from __future__ import annotations

from .tokenizer import TOKEN_BYTE, TOKEN_NORMAL, Tokenizer

SPACE = "\u2581"  # "▁"


class SPMTokenizer(Tokenizer):
    def __init__(self, tokens, scores, token_types=None, *, bos_id=1, eos_id=2, eot_id=None, unk_id=0,
                 add_bos=True, add_space_prefix=True, chat_template=None, name="tokenizer"):
        super().__init__(tokens, [], token_types, pre="gpt2", bos_id=bos_id, eos_id=eos_id, eot_id=eot_id,
                         unk_id=unk_id, add_bos=add_bos, chat_template=chat_template, name=name)
        self.scores = [float(x) for x in scores]
        if len(self.scores) != len(self.tokens):
            raise ValueError(f"{name}: {len(self.scores)} scores for {len(self.tokens)} tokens")
        self.add_space_prefix = bool(add_space_prefix)
        self.strip_leading_space = self.add_space_prefix
        self._byte_ids = {}
        for i, (t, k) in enumerate(zip(self.tokens, self.token_types)):
            if k == TOKEN_BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                self._byte_ids[int(t[3:5], 16)] = i
        # mergeable tokens: the ordinary vocabulary (control and byte tokens never come out of a merge)
        self._mergeable = {t: i for i, t in enumerate(self.tokens) if self.token_types[i] == TOKEN_NORMAL}

    @classmethod
    def from_gguf_metadata(cls, meta: dict, *, source: str = "GGUF file") -> "SPMTokenizer":
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
            if key not in meta:
                raise ValueError(f"{source}: metadata key {key!r} is missing")

        def opt(key, default=None):
            v = meta.get(key)
            return default if v is None else int(v)

        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta.get("tokenizer.ggml.token_type"),
                   bos_id=opt("tokenizer.ggml.bos_token_id", 1), eos_id=opt("tokenizer.ggml.eos_token_id", 2),
                   eot_id=opt("tokenizer.ggml.eot_token_id"), unk_id=opt("tokenizer.ggml.unknown_token_id", 0),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                   add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                   chat_template=meta.get("tokenizer.chat_template"), name=source)

    # ------------------------------------------------------------------ encode

    def _encode_ordinary(self, text: str, out: list) -> None:
        if not text:
            return
        if self.add_space_prefix:
            text = " " + text  # encode() calls this at the start and after each special token only
        text = text.replace(" ", SPACE)
        hit = self._cache.get(text)
        if hit is None:
            hit = self._merge(text)
            if len(self._cache) < 100_000:
                self._cache[text] = hit
        out.extend(hit)

    def _merge(self, text: str) -> tuple[int, ...]:
        symbols = list(text)  # unicode characters
        vocab, scores = self._mergeable, self.scores
        while len(symbols) > 1:
            best, best_score = -1, None
            for j in range(len(symbols) - 1):
                i = vocab.get(symbols[j] + symbols[j + 1])
                if i is not None and (best_score is None or scores[i] > best_score):
                    best, best_score = j, scores[i]
            if best < 0:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        ids = []
        for s in symbols:
            i = vocab.get(s)
            if i is not None:
                ids.append(i)
                continue
            for b in s.encode("utf-8"):  # byte fallback
                j = self._byte_ids.get(b, self.unk_id)
                if j is None:
                    raise ValueError(f"{self.name}: {s!r} is not in the vocabulary, with no byte tokens or unk token")
                ids.append(j)
        return tuple(ids)

    # ------------------------------------------------------------------ decode

    def token_bytes(self, token_id: int, *, skip_special: bool = False) -> bytes:
        if not 0 <= token_id < len(self.tokens):
            raise ValueError(f"{self.name}: token id {token_id} is outside the vocabulary (0..{len(self.tokens) - 1})")
        kind, tok = self.token_types[token_id], self.tokens[token_id]
        if kind == TOKEN_BYTE:
            return bytes([int(tok[3:5], 16)])
        if token_id in self.special_ids:
            return b"" if skip_special else tok.encode("utf-8")
        return tok.replace(SPACE, " ").encode("utf-8")

    def decode(self, ids, *, skip_special: bool = False) -> str:
        text = super().decode(ids, skip_special=skip_special)
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text
