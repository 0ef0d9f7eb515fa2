"""Text generation: prefill, then token-by-token decode over a preallocated KV cache.

- One prompt: a contiguous `KVCache` of prompt + max_new_tokens positions.
- Several prompts (any lengths): one `PagedKVCache` per layer; the prompts are right-padded into one
  prefill batch with per-row `lengths`, and a sequence that finishes (EOS) leaves the decode batch,
  its blocks going back to the free list.
- Greedy (temperature 0) or sampling (temperature, top-k, top-p) with one seeded generator per prompt,
  so a prompt samples the same tokens alone or in a batch.

The decode step does constant Python work per token besides the layer loop inside the model: sample,
one device->host copy of the new token ids (needed for EOS and streaming), stream the text.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import _backends
from ..nn.paged_kv_cache import default_block_size

log = logging.getLogger("llmkern")


@dataclass
class GenerationResult:
    texts: list            # generated text per prompt (stop token excluded)
    tokens: list           # generated token ids per prompt
    prompt_tokens: list    # prompt token ids per prompt (after the chat template)
    finish_reasons: list   # "stop" (EOS / stop id) or "length" per prompt
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.texts[0]

    def summary(self) -> str:
        s = self.stats
        line = (f"prefill {s['prefill_tokens']} tok in {s['prefill_s'] * 1e3:.0f} ms ({s['prefill_tok_s']:.1f} tok/s), "
                f"decode {s['decode_tokens']} tok in {s['decode_s'] * 1e3:.0f} ms ({s['decode_tok_s']:.1f} tok/s, "
                f"{s['ms_per_step']:.1f} ms/step), weights {s['weight_bytes_per_token'] / 1e6:.1f} MB/token "
                f"-> {s['decode_gb_s']:.2f} GB/s")
        if s.get("bandwidth_gb_s"):
            line += f" = {100 * s['decode_gb_s'] / s['bandwidth_gb_s']:.0f}% of {s['bandwidth_gb_s']:.1f} GB/s measured"
        if s.get("cuda_graph"):
            line += ", decode steps as a CUDA graph"
        return line


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generators=None) -> torch.Tensor:
    """logits [B, V] -> token ids int64 [B]. temperature <= 0: argmax (greedy).

    Otherwise softmax(logits / temperature) restricted to the top_k most likely tokens (0: all) and
    to the smallest set whose probability reaches top_p (the most likely token always stays), one
    draw per row from generators[b].
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    x = logits.float()
    # Shifted so that the largest is 0 before dividing: a tiny temperature gives -inf for the others (a greedy
    # draw), never inf - inf = NaN probabilities.
    x = (x - x.amax(dim=-1, keepdim=True)) / temperature  # [B, V]
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [B, V]
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches top_p
        drop[:, 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for b in range(x.shape[0]):
        g = generators[b] if generators is not None else None
        out[b] = torch.multinomial(probs[b], 1, generator=g)[0]
    return out


def _prompt_ids(tokenizer, p, chat: bool, system):
    if isinstance(p, (list, tuple)) and p and all(isinstance(t, int) for t in p):
        return list(p)  # already token ids
    if chat:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        return tokenizer.encode_chat(msgs)
    if not isinstance(p, str):
        raise TypeError(f"generate: with chat=False a prompt must be a str or token ids, got {type(p).__name__}")
    return tokenizer.encode(p)


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stream=None, chat: bool = True, system: str | None = None,
             stop_ids=None, paged: bool | None = None, block_size: int | None = None,
             kv_int8: bool = False, cuda_graph: bool | None = None) -> GenerationResult:
    """Generate continuations of `prompts` (a str, or a list of prompts of any lengths).

    A prompt is a str (a user turn with chat=True, raw text with chat=False), a list of chat messages
    [{"role", "content"}], or a list of token ids. stream(index, text) receives each prompt's text as
    it is produced. paged: None = a paged cache for several prompts, a contiguous one for one.
    block_size: the paged cache's tokens per block (None: `default_block_size`, 64 on the CPU, 16 on GPUs).
    cuda_graph: on a GPU, replay the decode step as one CUDA graph after two eager steps (models/cuda_graph.py;
    same kernels, one launch; captured again when finished prompts leave a paged batch); None:
    LLMKERN_CUDA_GRAPH=1 turns it on (off by default until a GPU run has checked it). Where it cannot apply
    (CPU) or its capture fails (a warning on the llmkern logger), the steps run eagerly. stats["cuda_graph"]
    says whether it ran ("cuda_graph_steps": how many steps).
    """
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], (dict, int))):
        prompts = [prompts]
    if not prompts:
        raise ValueError("generate: prompts is empty")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature):
        raise ValueError(f"generate: temperature must be finite (<= 0: greedy), got {temperature}")
    if not 0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0, got {top_k}")
    ids = [_prompt_ids(tokenizer, p, chat, system) for p in prompts]
    V = model.config.vocab_size
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"generate: prompt {i} encodes to no tokens")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"generate: prompt {i} has token ids {min(p)}..{max(p)}, outside the vocabulary "
                             f"(0..{V - 1})")
    B = len(ids)
    lens = [len(p) for p in ids]
    max_len = max(lens) + max_new_tokens
    limit = model.config.max_positions
    if max_len > limit:
        raise ValueError(f"generate: prompt ({max(lens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} positions")
    stops = set(tokenizer.stop_ids if stop_ids is None else stop_ids)
    device = model.device
    paged = B > 1 if paged is None else paged
    gens = None
    if temperature > 0:
        gens = []
        for b in range(B):
            g = torch.Generator(device=device)
            if seed is None:
                g.seed()
            else:
                g.manual_seed(seed + b)
            gens.append(g)
    if cuda_graph is None:
        cuda_graph = _backends.env("LLMKERN_CUDA_GRAPH") == "1"
    graphed = None  # the GraphedDecodeStep, once captured
    decoders = [tokenizer.stream_decoder() for _ in range(B)]
    out_tokens = [[] for _ in range(B)]
    texts = [[] for _ in range(B)]
    reasons = ["length"] * B

    with torch.inference_mode():
        if paged:
            if block_size is None:
                block_size = default_block_size(device)
            num_blocks = sum(-(-(n + max_new_tokens) // block_size) for n in lens)
            cache = model.new_cache(paged=True, block_size=block_size, num_blocks=num_blocks, int8=kv_int8)
            seq_ids = [[c.add_sequence() for _ in range(B)] for c in cache]
            if any(s != seq_ids[0] for s in seq_ids):
                raise RuntimeError("generate: the per-layer paged caches handed out different sequence ids")
            seq_ids = seq_ids[0]
        else:
            cache = model.new_cache(B, max_len, int8=kv_int8)
            seq_ids = None
        # prefill: prompts right-padded to [B, S] with per-row lengths
        S = max(lens)
        tokens = torch.zeros(B, S, dtype=torch.long)
        for b, p in enumerate(ids):
            tokens[b, :len(p)] = torch.tensor(p)
        tokens = tokens.to(device)
        lengths = None if len(set(lens)) == 1 else torch.tensor(lens, dtype=torch.int32, device=device)
        t0 = time.perf_counter()
        logits = model(tokens, cache, seq_ids=seq_ids, lengths=lengths, last_only=True)  # [B, V]
        nxt = sample(logits, temperature, top_k, top_p, gens)
        new = nxt.tolist()
        t1 = time.perf_counter()

        active = list(range(B))  # batch rows -> prompt index (paged: only unfinished prompts)
        done = [False] * B
        steps = decode_tokens = 0
        eager = graph_steps = 0  # eager steps since the batch last changed; steps replayed as a CUDA graph
        while True:
            for row, b in enumerate(active):
                if done[b]:
                    continue  # contiguous cache: a finished row keeps decoding, its tokens are ignored
                t = new[row]
                if t in stops:
                    reasons[b], done[b] = "stop", True
                    continue
                out_tokens[b].append(t)
                piece = decoders[b].push(t)
                if piece:
                    texts[b].append(piece)
                    if stream is not None:
                        stream(b, piece)
                done[b] = len(out_tokens[b]) >= max_new_tokens
            if all(done):
                break
            if paged and any(done[b] for b in active):
                # finished sequences leave the batch and return their blocks
                keep = [row for row, b in enumerate(active) if not done[b]]
                for b in active:
                    if done[b]:
                        for c in cache:
                            c.free_sequence(seq_ids[b])
                nxt = nxt.index_select(0, torch.tensor(keep, device=device))
                active = [active[row] for row in keep]
                graphed, eager = None, 0  # (a graph is of one batch: capture the new one after two eager steps)
            step_ids = [seq_ids[b] for b in active] if paged else None
            tok = nxt.view(-1, 1)  # [B_active, 1]
            if cuda_graph and graphed is None and eager >= 2:
                graphed = _capture(model, cache, tok, step_ids)
                cuda_graph = graphed is not None  # (a failed capture is not tried again)
            logits = graphed(tok) if graphed is not None else None  # (None: the caches cannot take it so)
            if logits is None:
                logits = model(tok, cache, seq_ids=step_ids, last_only=True)  # [B_active, V]
                eager += 1
            else:
                graph_steps += 1
            nxt = sample(logits, temperature, top_k, top_p, None if gens is None else [gens[b] for b in active])
            new = nxt.tolist()
            steps += 1
            decode_tokens += sum(not done[b] for b in active)
        t2 = time.perf_counter()
    model.__dict__.pop("_decode_plan", None)  # it holds this call's cache tensors
    model.__dict__.pop("_steps", None)  # (so do the shared paged step tensors: Llama._paged_steps)

    for b in range(B):
        tail = decoders[b].flush()
        if tail:
            texts[b].append(tail)
            if stream is not None:
                stream(b, tail)
    wbytes = model.weight_bytes_per_token()
    prefill_s, decode_s = t1 - t0, t2 - t1
    stats = {
        "prefill_tokens": sum(lens), "prefill_s": prefill_s,
        "prefill_tok_s": sum(lens) / prefill_s if prefill_s > 0 else 0.0,
        "decode_tokens": decode_tokens, "decode_steps": steps, "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s if decode_s > 0 and steps else 0.0,
        "ms_per_step": 1e3 * decode_s / steps if steps else 0.0,
        "weight_bytes_per_token": wbytes,
        # each decode step reads every weight once, whatever the batch size
        "decode_gb_s": wbytes * steps / decode_s / 1e9 if decode_s > 0 and steps else 0.0,
        "batch_size": B, "paged": paged, "cuda_graph": graph_steps > 0, "cuda_graph_steps": graph_steps,
    }
    return GenerationResult(["".join(t) for t in texts], out_tokens, ids, reasons, stats)


def _capture(model, cache, tokens, seq_ids):
    """generate's GraphedDecodeStep for these caches, or None (not applicable, or the capture failed: logged)."""
    from . import cuda_graph

    factory = cuda_graph.GRAPH_FACTORY
    if factory is None and not cuda_graph.applies(model, cache, tokens, seq_ids):
        return None
    try:
        return cuda_graph.GraphedDecodeStep(model, cache, tokens.shape[0], tokens.device, factory,
                                            seq_ids).capture()
    except Exception as e:  # noqa: BLE001 - any capture failure: the eager steps are always there
        log.warning("llmkern generate: the CUDA graph of the decode step could not be captured (%s: %s); "
                    "decoding eagerly", type(e).__name__, e)
        return None


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Read bandwidth in GB/s of a float32 buffer of `nbytes` (CPU), defined as benchmarks/_machine.py
    defines it, so that the summary's fraction means what the benchmark reports' "% BW" means: the
    median of `repeats` reads by torch's sum and by llmkern's streaming probe `_C.read_sum`, the faster
    of the two. (The best single read, used before, swung from 45 to 97 GB/s between runs on the shared
    2-core VM.)"""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # first touch
    C = _backends.cpu_module()
    reads = [lambda: x.sum()]
    if C is not None and hasattr(C, "read_sum"):
        n, threads = x.numel(), torch.get_num_threads()
        reads.append(lambda: C.read_sum(x.data_ptr(), n, threads))
    medians = []
    for read in reads:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        medians.append(statistics.median(times))
    return nbytes / min(medians) / 1e9
