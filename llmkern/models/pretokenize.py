"""Pre-tokenizers of byte-level BPE models, as hand-written scanners (no `regex` dependency).

Python's `re` has no \\p{L} / \\p{N}, so each pattern below is implemented as a scanner that makes
the same leftmost-first choices as a backtracking regex engine. Classes: L = letter (unicode
category L*), N = number (N*), S = white space (the Unicode White_Space property, which is what
\\s means in the Rust/Oniguruma engines of `tokenizers`), O = anything else.

- GPT-2:   's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
- Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|
           \\s*[\\r\\n]+|\\s+(?!\\S)|\\s+        (Qwen2: \\p{N} one digit at a time instead of {1,3})
- SmolLM / StarCoder: every digit is first split off on its own (tokenizers' Digits(individual_digits)),
  then GPT-2's pattern runs on each piece.
"""
from __future__ import annotations

import unicodedata

_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_CLASS: dict[str, str] = {}
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # in the pattern's alternation order


def char_class(c: str) -> str:
    """'L', 'N', 'S' or 'O' (see module docstring); cached per character."""
    k = _CLASS.get(c)
    if k is None:
        if c in _WHITE_SPACE:
            k = "S"
        else:
            cat = unicodedata.category(c)[0]
            k = cat if cat in "LN" else "O"
        _CLASS[c] = k
    return k


def _run(text, j, n, cls):
    """End of the run of characters of class `cls` starting at j."""
    while j < n and char_class(text[j]) == cls:
        j += 1
    return j


def _contraction(text, i, n, ignore_case):
    if text[i] != "'":
        return 0
    for c in _CONTRACTIONS:
        seg = text[i + 1:i + 1 + len(c)]
        if (seg.lower() if ignore_case else seg) == c:
            return len(c) + 1
    return 0


def _trailing_space(text, i, n):
    """\\s+(?!\\S) then \\s+, at a white-space character i: the run, minus its last character when
    a non-space follows (that character then leads the next word), unless the run is one character."""
    j = _run(text, i, n, "S")
    if j < n and j - i >= 2:
        return j - 1
    return j


def split_gpt2(text: str) -> list[str]:
    out, i, n = [], 0, len(text)
    while i < n:
        k = _contraction(text, i, n, False)
        if k:
            out.append(text[i:i + k])
            i += k
            continue
        j = i + 1 if text[i] == " " and i + 1 < n else i
        cls = char_class(text[j])
        if cls in "LN":                                   # ' ?\p{L}+' or ' ?\p{N}+'
            end = _run(text, j, n, cls)
        elif cls == "O":                                  # ' ?[^\s\p{L}\p{N}]+'
            end = _run(text, j, n, "O")
        else:                                             # white space
            end = _trailing_space(text, i, n)
        out.append(text[i:end])
        i = end
    return out


def _split_llama3(text: str, max_digits: int) -> list[str]:
    out, i, n = [], 0, len(text)
    while i < n:
        k = _contraction(text, i, n, True)
        if k:
            out.append(text[i:i + k])
            i += k
            continue
        c = text[i]
        cls = char_class(c)
        nxt = char_class(text[i + 1]) if i + 1 < n else None
        if cls == "L":                                    # [^\r\n\p{L}\p{N}]?\p{L}+ without the prefix
            end = _run(text, i, n, "L")
        elif c not in "\r\n" and cls in "OS" and nxt == "L":  # ... with a one-character prefix
            end = _run(text, i + 1, n, "L")
        elif cls == "N":                                  # \p{N}{1,max_digits}
            end = i + 1
            while end < n and end - i < max_digits and char_class(text[end]) == "N":
                end += 1
        elif cls == "O" or (c == " " and nxt == "O"):     # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
            end = _run(text, i + 1 if c == " " else i, n, "O")
            while end < n and text[end] in "\r\n":
                end += 1
        else:                                             # white space
            j = _run(text, i, n, "S")
            last_nl = max(text.rfind("\r", i, j), text.rfind("\n", i, j))
            end = last_nl + 1 if last_nl >= 0 else _trailing_space(text, i, n)  # \s*[\r\n]+ first
        out.append(text[i:end])
        i = end
    return out


def split_digits(text: str) -> list[str]:
    """Every number character alone, the text between them kept whole."""
    out, start = [], 0
    for i, c in enumerate(text):
        if char_class(c) == "N":
            if start < i:
                out.append(text[start:i])
            out.append(c)
            start = i + 1
    if start < len(text):
        out.append(text[start:])
    return out


def split_digits_gpt2(text: str) -> list[str]:
    return [w for piece in split_digits(text) for w in split_gpt2(piece)]


def split_llama3(text: str) -> list[str]:
    return _split_llama3(text, 3)


def split_qwen2(text: str) -> list[str]:
    return _split_llama3(text, 1)


# tokenizer.ggml.pre names (llama.cpp's) -> scanner
PRETOKENIZERS = {
    "gpt2": split_gpt2, "gpt-2": split_gpt2, "phi-2": split_gpt2, "olmo": split_gpt2, "default": split_gpt2,
    "smollm": split_digits_gpt2, "starcoder": split_digits_gpt2, "refact": split_digits_gpt2,
    "command-r": split_digits_gpt2, "codeshell": split_digits_gpt2,
    "llama-bpe": split_llama3, "llama3": split_llama3, "smaug-bpe": split_llama3,
    "qwen2": split_qwen2, "deepseek-r1-qwen": split_qwen2,
}


def pretokenizer_for(name: str):
    try:
        return PRETOKENIZERS[name]
    except KeyError:
        raise ValueError(f"unsupported pre-tokenizer {name!r} (tokenizer.ggml.pre); llmkern has "
                         f"{sorted(PRETOKENIZERS)}") from None
