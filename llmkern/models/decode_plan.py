"""The decode step as a flat list of CPU kernel launches: `DecodePlan`.

A decode step of SmolLM2-135M is ~300 small calls (norms, linears, cache appends, attention) whose
kernels take a few microseconds each; through nn.Module.__call__, the modules' own argument handling
(KVCache.append computes slots and checks capacity, Attention.forward branches on the cache kind...)
and the op adapters, the Python around them cost more than the kernels. A plan binds, once per
(model, cache list, batch size), everything that does not change between steps: each layer's norm
weights, the prepared runners of its linears (`Op.prepare`), its cache tensors and the rotary table.
Then a step is, per layer, eight launches and two torch elementwise ops, with the same kernels and
the same arguments as the module path, so the logits are bit for bit the module path's.

Scope (else `DecodePlan.build` returns None and the model runs its modules): eager mode, CPU tensors,
the cpu backend (model backend None or "cpu", LLMKERN_BACKEND unset or "cpu"), one new token per
sequence (tokens [B, 1]) into a list of contiguous `KVCache`s without `lengths`, or into a list of
`PagedKVCache`s (with seq_ids) that agree on their sequences' blocks (decode_plan_paged.py; paged steps
need the step program), layers with fused projections (`Llama.fuse_projections`) whose linears have
prepared cpu runners.

Validity: the plan holds tensors, not modules, so `Llama.forward` checks `plan.matches(...)` before
each step: the same cache list, and the same objects in every slot the plan read (modules, weights,
eps, cache tensors, and each quantized linear's prepared runner, which the module drops whenever a
buffer changes), the same thread count and CPU ISA.

The step program: where every launch can be bound (the usual case), the plan also compiles the whole
step up to the final norm into one `llmkern._C.StepProgram` (csrc/cpu/decode_step.cpp): the same
kernel launches with their arguments checked once, over activation buffers the plan owns, replayed by
one Python call with the GIL released. That removes the ~10 Python-side launches per layer (SmolLM2:
~300 per step, a few microseconds each). Its logits equal the Python step's except for SwiGLU's
silu(gate) * up, computed by the program's own kernel (an exp within a few fp32 ulps of torch's, so
not bit-equal to F.silu). LLMKERN_DECODE_PROGRAM=0 keeps the Python step (for A/B measurements).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backends
from .. import nn as lnn
from ..nn.embedding import QuantizedEmbedding
from ..ops.decode_attention import _cpu_call as decode_attention_call
from ..ops.decode_attention import decode_attention_op
from ..ops.kv_cache_append import _cpu_call as kv_cache_append_call
from ..ops.kv_cache_append import kv_cache_append_op
from ..ops.rms_norm import _cpu_call as rms_norm_call
from ..ops.rms_norm import rms_norm_op
from .decode_plan_paged import PagedSteps


def head_logits(head, x: torch.Tensor, upcast: bool) -> torch.Tensor:
    """The final norm's output x [..., H] (model dtype) -> logits [..., V] in float32, whatever that dtype.

    head: the lm_head module, a plan's prepared run of it, or an nn.Linear head's weight tensor. 16-bit
    logits tie: near 20, bf16 values are 0.125 apart, and greedy decoding then takes the lower token id
    (SmolLM2 in bf16 answered "L'Étoile, ..." instead of "The capital of France is Paris."). upcast (a
    quantized head on the CPU, which streams its weights as fast for fp32 x): x is upcast and the logits
    computed in fp32. Otherwise a 16-bit output is upcast (its rounding stays, as in torch's bf16 matmul).
    """
    if upcast and x.dtype != torch.float32:
        x = x.float()
    out = F.linear(x, head) if isinstance(head, torch.Tensor) else head(x)
    return out if out.dtype == torch.float32 else out.float()


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _runner(mod):
    """The prepared cpu run(x) of a quantized linear (preparing it if needed), or None."""
    if not isinstance(mod, (lnn.Int8Linear, lnn.Int4Linear)):
        return None
    run = mod.__dict__.get("_run")
    if run is None:
        return None  # not called yet through the op (its first call checks and prepares it)
    return run if run.backend == "cpu" else None


def _id_list(seq_ids):
    """seq_ids (a list of ints or an int tensor) as a list of ints, or None."""
    if isinstance(seq_ids, torch.Tensor):
        return seq_ids.tolist() if seq_ids.dim() == 1 else None
    try:
        return [int(i) for i in seq_ids]
    except (TypeError, ValueError):
        return None


def _cpu_backend_selected(model) -> bool:
    if model.backend not in (None, "cpu"):
        return False
    return _backends.env_backend() in (None, "cpu")


def _labelled(call, role: str):
    """A linear's KernelCall named by its role ('int4_linear:qkv'), for the step's profile."""
    call.name = f"{call.name}:{role}"
    return call


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "eps2", "qkv", "o", "gate_up", "down", "cache", "split", "widths")


class DecodePlan:
    """One decode step of `model` over `cache` for `batch` sequences; see the module doc."""

    def __init__(self, model, cache, batch: int, layers: list, head_runner, checks: list, paged=None):
        self.model_id, self.cache, self.batch = id(model), cache, batch
        self.paged = paged  # PagedSteps over PagedKVCaches, else None (contiguous KVCaches)
        self.layers, self.head, self._checks = layers, head_runner, checks
        self._ptrs = []  # (tensor, data_ptr) of what the plan reads by pointer (set by build)
        c = model.config
        self.Hq, self.Hk, self.D, self.H = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self.final_norm, self.final_eps = model.norm.weight, model.norm.eps
        emb = model.embed_tokens
        # the embedding: a float table (nn.Embedding), or quantized tensors dequantized a row at a time
        self.embed_mod = emb
        quantized = isinstance(emb, QuantizedEmbedding)
        # (an int8 table tied to a released lm_head: its packed layout and the scales, format "int8_packed")
        self.embed_packed = emb.packed_source() if quantized else None
        self.embed_q = None if not quantized else self.embed_packed or emb.tensors()
        self.embed = emb.weight if self.embed_q is None else None
        self.act_dtype = emb.weight.dtype if self.embed_q is None else emb.dtype
        self.rotary = model.rotary.cos_sin_cache
        self.interleaved = model.rotary.interleaved
        self.threads, self.isa = torch.get_num_threads(), _backends.cpu_isa()
        self.program, self._buffers = None, None
        if _backends.env("LLMKERN_DECODE_PROGRAM") != "0":
            self._compile()

    # ------------------------------------------------------------------ build / validity

    @staticmethod
    def _watch(model, cache) -> list:
        """(dict, key) slots that hold everything the plan binds: checked by identity before each step.

        A module that replaces a weight, is moved (.to) or loaded (load_state_dict) puts a new object in
        one of these slots (quantized linears drop their prepared runner `_run`), so a stale plan is
        never used. Plain dict lookups: ~250 of them cost ~20 us, against the milliseconds saved.
        """
        emb = model.embed_tokens
        slots = [(model._modules, "embed_tokens")]
        slots += ([(emb._buffers, n) for n in emb._buffers] if isinstance(emb, QuantizedEmbedding)
                  else [(emb._parameters, "weight")])
        slots += [
                 (model._modules, "norm"), (model.norm._parameters, "weight"), (model.norm.__dict__, "eps"),
                 (model.__dict__, "rotary"), (model.rotary._buffers, "cos_sin_cache"),
                 (model._modules, "lm_head"), (model._modules, "layers")]
        head = model.lm_head
        slots.append((head._parameters, "weight") if isinstance(head, nn.Linear) else (head.__dict__, "_run"))
        for i, (layer, kv) in enumerate(zip(model.layers, cache)):
            a, m = layer.self_attn, layer.mlp
            slots += [(model.layers._modules, str(i)), (layer._modules, "self_attn"), (layer._modules, "mlp"),
                      (layer._modules, "input_layernorm"), (layer._modules, "post_attention_layernorm"),
                      (layer.input_layernorm._parameters, "weight"), (layer.input_layernorm.__dict__, "eps"),
                      (layer.post_attention_layernorm._parameters, "weight"),
                      (layer.post_attention_layernorm.__dict__, "eps"),
                      (a._modules, "qkv_proj"), (a._modules, "o_proj"), (a.__dict__, "rotary"),
                      (m._modules, "gate_up_proj"), (m._modules, "down_proj"),
                      (kv.__dict__, "k"), (kv.__dict__, "v"), (kv.__dict__, "k_scale"), (kv.__dict__, "v_scale"),
                      (kv.__dict__, "seq_lens"), (kv.__dict__, "_next")]  # the step program binds the counters
            for lin in (a._modules.get("qkv_proj"), a._modules.get("o_proj"), m._modules.get("gate_up_proj"),
                        m._modules.get("down_proj")):
                if lin is not None:
                    slots.append((lin.__dict__, "_run"))
        return slots

    @classmethod
    def build(cls, model, cache, tokens, seq_ids=None):
        """A plan for this step's inputs, or None when the step is outside the plan's scope."""
        if (torch.compiler.is_compiling() or not isinstance(cache, list) or tokens.device.type != "cpu"
                or tokens.dim() != 2 or tokens.shape[1] != 1 or not _cpu_backend_selected(model)):
            return None
        B = tokens.shape[0]
        if len(cache) != len(model.layers) or not cache:
            return None
        paged = None
        if seq_ids is None:
            if not all(type(kv) is lnn.KVCache and kv.batch_size == B and kv.device.type == "cpu"
                       and kv.dtype == model.dtype for kv in cache):
                return None
        else:
            ids = _id_list(seq_ids)
            if ids is None or len(ids) != B or not PagedSteps.compatible(cache, ids, model):
                return None
            paged = PagedSteps(cache, ids)
        if not isinstance(model.norm, lnn.RMSNorm) or model.rotary.cos_sin_cache.device.type != "cpu":
            return None
        layers = []
        for layer, kv in zip(model.layers, cache):
            a, m = layer.self_attn, layer.mlp
            qkv, gate_up = a._modules.get("qkv_proj"), m._modules.get("gate_up_proj")
            if qkv is None or gate_up is None or a.rotary is not model.rotary or a.window_left != -1:
                return None  # (sliding windows: the module path)
            L = _Layer()
            L.qkv, L.o, L.gate_up, L.down = (_runner(qkv), _runner(a.o_proj), _runner(gate_up), _runner(m.down_proj))
            if None in (L.qkv, L.o, L.gate_up, L.down):
                return None
            if not (isinstance(layer.input_layernorm, lnn.RMSNorm) and isinstance(layer.post_attention_layernorm,
                                                                                  lnn.RMSNorm)):
                return None
            L.ln1, L.eps1 = layer.input_layernorm.weight.detach(), layer.input_layernorm.eps
            L.ln2, L.eps2 = layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.eps
            L.cache = kv
            Hq, Hk, D = a.num_heads, a.num_kv_heads, a.head_dim
            L.split = (Hq * D, Hk * D, Hk * D)
            # (qkv, gate_up, down) output widths, for the step program's buffers
            L.widths = (qkv.out_features, gate_up.out_features, m.down_proj.out_features)
            layers.append(L)
        head = model.lm_head
        if isinstance(head, nn.Linear):
            if head.bias is not None:
                return None
            head_runner = head.weight.detach()
        else:
            head_runner = _runner(head)
            if head_runner is None:
                return None
        checks = [(d, k, d.get(k)) for d, k in cls._watch(model, cache)]
        # Tensors the plan reads by pointer: `p.data = other` keeps the Parameter (no identity check sees it) but
        # moves its storage, so their data pointers are checked too (as llmkern.nn.RMSNorm checks its weight's).
        emb = model.embed_tokens
        emb_t = (emb.weight,) if not isinstance(emb, QuantizedEmbedding) else emb.packed_source() or emb.tensors()
        bound = [*emb_t, model.norm.weight,
                 model.rotary.cos_sin_cache]
        bound += [n.weight for layer in model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if isinstance(head, nn.Linear):
            bound.append(head.weight)
        plan = cls(model, cache, B, layers, head_runner, checks, paged)
        plan._ptrs = [(t, t.data_ptr()) for t in bound]
        if paged is not None and plan.program is None:
            return None  # paged steps run only as the program (the Python step knows contiguous caches)
        return plan

    def matches(self, model, cache, tokens, seq_ids=None) -> bool:
        """This plan still describes `model` and `cache` (see `_watch`) for a batch of tokens' size (and,
        paged, the same sequence ids in the same order)."""
        if id(model) != self.model_id or cache is not self.cache or tokens.shape[0] != self.batch:
            return False
        if (seq_ids is None) != (self.paged is None) or (seq_ids is not None and (
                self.paged.stale or _id_list(seq_ids) != self.paged.ids)):
            return False
        if not _cpu_backend_selected(model) or len(cache) != len(self.layers):
            return False
        if torch.get_num_threads() != self.threads or _backends.cpu_isa() != self.isa:
            return False  # every launch was bound with them
        for d, k, v in self._checks:
            if d.get(k) is not v:
                return False
        for t, ptr in self._ptrs:
            if t.data_ptr() != ptr:
                return False
        return True

    # ------------------------------------------------------------------ the step

    def ready(self) -> bool:
        """Every cache has room for one more token, within the rotary table (else the module path
        raises the cache's own error)."""
        n = self.rotary.shape[0]
        if self.paged is not None:
            return self.paged.prepare(n)  # allocates the blocks the new tokens start
        for L in self.layers:
            kv = L.cache
            if kv._host_lens is None or kv._host_max + 1 > kv.max_seq_len or kv._host_max + 1 > n:
                return False
        return True

    def _compile(self) -> None:
        """Build `self.program` (see the module doc) and the buffers it runs over, or leave it None when a
        launch cannot be bound (then `step` launches from Python)."""
        mod = _backends.cpu_module()
        B, H, Hq, Hk, D = self.batch, self.H, self.Hq, self.Hk, self.D
        dt = self.act_dtype
        W, I2, Hd = self.layers[0].widths
        emb = (self.embed,) if self.embed_q is None else self.embed_q
        bound = (*emb, self.rotary, self.final_norm, *(L.ln1 for L in self.layers), *(L.ln2 for L in self.layers))
        if (mod is None or not hasattr(mod, "StepProgram") or dt not in _DTYPE_CODE or B < 1
                or not all(t.is_contiguous() for t in bound)  # bound by pointer: no copies
                or Hd != H or I2 % 2 or W != (Hq + 2 * Hk) * D
                or any(L.widths != (W, I2, Hd)
                       or not all(hasattr(r.impl, "call") for r in (L.qkv, L.o, L.gate_up, L.down))
                       for L in self.layers)):
            return
        T = self.threads
        new = lambda *shape: torch.empty(shape, dtype=dt)  # noqa: E731
        buf = dict(tokens=torch.zeros(B, dtype=torch.int64), emb=new(B, H), xn=new(B, H),
                   res=(new(B, H), new(B, H)), qkv=new(B, W), attn=new(B, Hq, D), o=new(B, H), gu=new(B, I2),
                   act=new(B, I2 // 2), down=new(B, H))
        paged = self.paged
        capacity = paged.capacity if paged is not None else max(L.cache.max_seq_len for L in self.layers)
        ws_bytes = max([mod.decode_attention_workspace_size(B, 1, Hq, Hk, D, capacity, T)]
                       + [r.impl.workspace_size(B, T) for L in self.layers for r in (L.qkv, L.o, L.gate_up, L.down)])
        buf["ws"] = ws = torch.empty(max(ws_bytes, 64), dtype=torch.uint8)  # shared: the calls run one by one
        # Detached aliases of every tensor a call reads by pointer: the storage stays alive even if a module's
        # parameter is given new data in place of the old (`p.data = ...`) until the next step's `matches`,
        # which compares these tensors' data pointers, drops the plan.
        buf["keep"] = [t.detach() for t in bound] + [t for L in self.layers for t in (
            L.cache.k, L.cache.v, L.cache.k_scale, L.cache.v_scale, getattr(L.cache, "seq_lens", None),
            getattr(L.cache, "_next", None)) if isinstance(t, torch.Tensor)]
        prog = mod.StepProgram()
        isa = self.isa
        if self.embed_q is None:
            prog.append(mod.embedding_call(self.embed.data_ptr(), _DTYPE_CODE[dt], self.embed.shape[0], H,
                                           buf["tokens"].data_ptr(), B, buf["emb"].data_ptr()))
        else:  # int8 (weight or the tied head's packed layout, weight_scale) or int4 (qweight, scales, offsets) rows
            q = self.embed_q
            G = H if q[1].dim() == 1 else H // q[1].shape[1]
            fmt = "int8_packed" if self.embed_packed is not None else self.embed_mod.format
            prog.append(mod.quant_embedding_call(fmt, q[0].data_ptr(), q[1].data_ptr(),
                                                 q[2].data_ptr() if len(q) > 2 else 0, self.embed_mod.num_embeddings,
                                                 H, G, _DTYPE_CODE[dt], buf["tokens"].data_ptr(), B,
                                                 buf["emb"].data_ptr()))
        xn, qkv, attn, gu = buf["xn"], buf["qkv"], buf["attn"], buf["gu"]
        h, residual, flip = buf["emb"], None, 0  # h: this layer's input; residual: the running sum (None: h)
        q = qkv[:, :Hq * D].view(B, 1, Hq, D)                         # [B, W] -> views of q, k, v per token
        k = qkv[:, Hq * D:(Hq + Hk) * D].view(B, 1, Hk, D)
        v = qkv[:, (Hq + Hk) * D:].view(B, 1, Hk, D)
        for L in self.layers:
            kv = L.cache
            if residual is None:
                prog.append(rms_norm_call(h, L.ln1, L.eps1, None, xn, None, T))
                residual = h
            else:
                out = buf["res"][flip]
                prog.append(rms_norm_call(h, L.ln1, L.eps1, residual, xn, out, T))  # out = h + residual
                residual, flip = out, 1 - flip
            prog.append(_labelled(L.qkv.impl.call(xn, qkv, ws, T), "qkv"))
            if paged is None:
                pos, slot = kv._next_views                              # [B, 1] int64 views, advanced in place
                lens, table = kv.seq_lens, None
            else:
                pos, slot, lens, table = paged.pos, paged.slot, paged.lens, paged.table  # refilled each step
            prog.append(kv_cache_append_call(k, v, kv.k, kv.v, slot, kv.k_scale, kv.v_scale, q, pos,
                                             self.rotary, self.interleaved, T))  # rotates q in place
            if paged is None:
                prog.append(mod.advance_call(kv.seq_lens.data_ptr(), kv._next.data_ptr(), B))
            prog.append(decode_attention_call(q.view(B, Hq, D), kv.k, kv.v, lens, kv.k_scale,
                                              kv.v_scale, attn, ws, T, table))  # q [B, 1, Hq, D] -> [B, Hq, D]
            # attn [B, Hq, D] -> [B, Hq * D] -> o [B, H]
            prog.append(_labelled(L.o.impl.call(attn.view(B, Hq * D), buf["o"], ws, T), "o"))
            out = buf["res"][flip]
            prog.append(rms_norm_call(buf["o"], L.ln2, L.eps2, residual, xn, out, T))  # residual += attn
            residual, flip = out, 1 - flip
            prog.append(_labelled(L.gate_up.impl.call(xn, gu, ws, T), "gate_up"))  # [B, 2I]: gate then up
            prog.append(mod.silu_mul_call(gu.data_ptr(), _DTYPE_CODE[dt], I2, B, I2 // 2, buf["act"].data_ptr(),
                                          I2 // 2, isa))
            prog.append(_labelled(L.down.impl.call(buf["act"], buf["down"], ws, T), "down"))
            h = buf["down"]
        prog.append(rms_norm_call(h, self.final_norm, self.final_eps, residual, xn, buf["res"][flip], T))
        self.program, self._buffers = prog, buf

    def _run_program(self, tokens: torch.Tensor, timings: list | None = None) -> torch.Tensor:
        """tokens int [B, 1] -> logits [B, V] through the compiled step program; with `timings`, each
        launch's (op name, seconds) is appended to it (the lm_head's as "lm_head")."""
        buf = self._buffers
        buf["tokens"].copy_(tokens.view(self.batch))                     # [B, 1] -> [B]
        if timings is None:
            self.program.run()
        else:
            timings += zip(self.program.names(), self.program.run_timed())
        if self.paged is not None:
            self.paged.advance()
        else:
            for L in self.layers:
                L.cache._advance_one(counters=False)  # the program advanced seq_lens and the slot table itself
        x = buf["xn"]
        t0 = time.perf_counter()
        logits = head_logits(self.head, x, not isinstance(self.head, torch.Tensor))  # (else a quantized run)
        if timings is not None:
            timings.append(("lm_head", time.perf_counter() - t0))
        return logits

    def step_timed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
        """step(tokens) with the step program's per-launch times: (logits [B, V], [(op name, seconds)]).
        benchmarks/profile_decode.py prints them per op. Needs the program (`self.program`)."""
        if self.program is None:
            raise RuntimeError("DecodePlan.step_timed: no step program (LLMKERN_DECODE_PROGRAM=0, or not buildable)")
        timings: list = []
        return self._run_program(tokens, timings), timings

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int [B, 1] -> logits [B, V] of the new tokens (as model(tokens, cache, last_only=True))."""
        if self.program is not None:
            return self._run_program(tokens)
        B, H, Hq, Hk, D = self.batch, self.H, self.Hq, self.Hk, self.D
        rms = rms_norm_op.impls["cpu"]
        append = kv_cache_append_op.impls["cpu"]
        attend = decode_attention_op.impls["cpu"]
        rot, inter = self.rotary, self.interleaved
        h = self.embed_mod(tokens.view(B, 1)).view(B, H)  # [B, 1] -> [B, 1, H] -> [B, H]
        residual = None
        for L in self.layers:
            if residual is None:
                x, _ = rms(h, L.ln1, L.eps1, None)
                residual = h
            else:
                x, residual = rms(h, L.ln1, L.eps1, residual)          # residual = h + residual
            q, k, v = L.qkv(x).split(L.split, dim=-1)                   # [B, (Hq + 2 Hk) D] -> 3 views
            q, k, v = q.view(B, 1, Hq, D), k.view(B, 1, Hk, D), v.view(B, 1, Hk, D)
            kv = L.cache
            pos, slot = kv._next_views                                  # [B, 1] each
            append(k, v, kv.k, kv.v, slot, kv.k_scale, kv.v_scale, q, pos, rot, inter)  # rotates q in place
            kv._advance_one()
            a = attend(q.view(B, Hq, D), kv.k, kv.v, kv.seq_lens, None, kv.k_scale, kv.v_scale, None, 0.0, -1)
            a = L.o(a.view(B, Hq * D))                                   # [B, Hq, D] -> [B, Hq*D] -> [B, H]
            x, residual = rms(a, L.ln2, L.eps2, residual)               # residual += attention output
            g, u = L.gate_up(x).chunk(2, dim=-1)                        # [B, 2I] -> two [B, I] views
            h = L.down(F.silu(g) * u)
        x, _ = rms(h, self.final_norm, self.final_eps, residual)
        return head_logits(self.head, x, not isinstance(self.head, torch.Tensor))
