"""Every kernel variant the launchers can pick, as (name, kernel, argument types, constexprs, options),
for compile-only checks and triton_kernels/COMPILE_REPORT.md (scripts/triton_compile_report.py).

Argument types use Triton's signature names: "*bf16" pointers, "i32" ints, "fp32" floats. Configs come
from the launchers' own `config` functions, so the report covers what the dispatcher runs.

`vals` gives int arguments the values of a representative call (Llama-like shapes: Hq 32, Hk 8, D 128,
contiguous tensors). The report specializes them as the JIT does at a launch (`specialize` below): an int
equal to 1 becomes a constant, one divisible by 16 gets a divisibility-16 hint, and every pointer is
16-byte aligned (torch allocations are). Those hints decide whether loads are vectorized, which decides
register use: without them (an odd head dim or stride), a kernel compiles as with `--no-hints`.
"""
from __future__ import annotations

import torch

from . import attention, decode_attention, kv_cache_append, rms_norm, rotary_embedding
from ._common import TL_NAME, pow2

P = {k: "*" + v for k, v in TL_NAME.items()}  # torch dtype -> pointer type


def _v(name, kernel, types: dict, const: dict, num_warps=4, num_stages=2, vals: dict | None = None):
    return {"name": name, "kernel": kernel, "types": types, "const": const,
            "num_warps": num_warps, "num_stages": num_stages, "vals": dict(vals or {})}


def specialize(v: dict, hints: bool = True):
    """(signature, constexprs, attrs) for triton.compile(ASTSource(...)) as the JIT builds them for a call
    with v["vals"]: ints equal to 1 become constexprs, ints divisible by 16 and (16-byte aligned) pointers
    get tt.divisibility 16. hints=False: no specialization at all (the worst case, e.g. D = 72)."""
    names = v["kernel"].arg_names
    sig = dict(v["types"])
    const = dict(v["const"])
    attrs = {}
    for a, t in v["types"].items():
        val = v["vals"].get(a)
        if not hints:
            continue
        if t.startswith("*"):
            attrs[(names.index(a),)] = [["tt.divisibility", 16]]
        elif t in ("i32", "i64") and val is not None:
            if val == 1:
                const[a] = 1
            elif val % 16 == 0:
                attrs[(names.index(a),)] = [["tt.divisibility", 16]]
    for k in const:
        sig[k] = "constexpr"
    return {a: sig[a] for a in names}, const, attrs


def _ints(*names):
    return {n: "i32" for n in names}


def variants(cap: int) -> list[dict]:
    """Variants compiled for sm_<cap> (80 or 90)."""
    bf, f32, i8 = torch.bfloat16, torch.float32, torch.int8
    out = []
    # rms_norm: a typical and the widest row.
    for N in (4096, rms_norm.MAX_N):
        for res in (False, True):
            c = rms_norm.config(N)
            out.append(_v(f"rms_norm N={N} residual={res}", rms_norm.rms_norm_kernel,
                          {"x_ptr": P[bf], "r_ptr": P[bf], "w_ptr": P[bf], "y_ptr": P[bf], "h_ptr": P[bf],
                           **_ints("N", "stride_x", "stride_r"), "eps": "fp32"},
                          {"HAS_RES": res, "BLOCK": c["BLOCK"]}, c["num_warps"],
                          vals={"N": N, "stride_x": N, "stride_r": N}))
    bh, bd = rotary_embedding.tile(32, 128)
    for il in (False, True):
        out.append(_v(f"rotary H=32 D=128 interleaved={il}", rotary_embedding.rotary_kernel,
                      {"x_ptr": P[bf], "out_ptr": P[bf], "pos_ptr": P[torch.int64], "cs_ptr": P[f32],
                       **_ints("H", "D", "R", "stride_t", "stride_h", "stride_cs")},
                      {"INTERLEAVED": il, "BLOCK_H": bh, "BLOCK_D": bd}, rotary_embedding.NUM_WARPS,
                      vals={"H": 32, "D": 128, "R": 128, "stride_t": 32 * 128, "stride_h": 128, "stride_cs": 128}))
    bh, bd = rotary_embedding.tile(32, 128)
    for rot, int8 in ((False, False), (True, False), (False, True), (True, True)):
        cdt = i8 if int8 else bf
        out.append(_v(f"kv_cache_append D=128 rotary={rot} int8={int8}", kv_cache_append.kv_append_kernel,
                      {"k_ptr": P[bf], "v_ptr": P[bf], "kc_ptr": P[cdt], "vc_ptr": P[cdt],
                       "slot_ptr": P[torch.int64], "ks_ptr": P[f32], "vs_ptr": P[f32], "q_ptr": P[bf],
                       "pos_ptr": P[torch.int64], "cs_ptr": P[f32],
                       **_ints("Hk", "Hq", "D", "R", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                               "stride_qt", "stride_qh", "stride_cs")},
                      {"ROTARY": rot, "ROTATE_Q": rot, "INTERLEAVED": False, "INT8": int8,
                       "BLOCK_H": bh, "BLOCK_D": bd}, rotary_embedding.NUM_WARPS,
                      # k, v, q slices of a fused qkv projection [T, (32 + 8 + 8) * 128]; R = 2 without rotary.
                      vals={"Hk": 8, "Hq": 32, "D": 128, "R": 128 if rot else 2, "stride_kt": 48 * 128,
                            "stride_kh": 128, "stride_vt": 48 * 128, "stride_vh": 128, "stride_qt": 48 * 128,
                            "stride_qh": 128, "stride_cs": 128 if rot else 0}))
    # decode: one split (direct) and split-KV, contiguous and paged, int8, softcap, fp32, D 120/128/256, 128 rows.
    for D, rows, dt, paged, int8, cap_, direct in (
            (128, 4, bf, False, False, False, True), (128, 4, bf, True, False, False, False),
            (120, 4, bf, True, False, False, False),
            (128, 4, bf, True, True, False, False), (128, 4, bf, True, False, True, False),
            (256, 8, bf, True, False, False, False), (128, 4, f32, True, False, False, False),
            (128, 128, bf, True, False, False, False), (256, 128, bf, True, True, False, False)):
        c = decode_attention.config(rows, D, 4096, 64, dt, num_splits=1 if direct else 4)
        c["BLOCK_N"] = decode_attention.GPU_BLOCK_N  # config() shrinks it only under the interpreter
        cdt = i8 if int8 else dt
        # Hk 8 heads, GROUP x Sq = rows (Sq 1, or 8 new tokens for 128 rows), paged blocks of 16 tokens.
        Hk, Sq, bs = 8, (8 if rows == 128 else 1), (16 if paged else 4096)
        group = rows // Sq
        dv = {"Sq": Sq, "Hq": Hk * group, "D": D, "GROUP": group, "split_size": c["split_size"],
              "num_splits": c["num_splits"], "block_size": bs, "stride_qb": Sq * Hk * group * D,
              "stride_qs": Hk * group * D, "stride_qh": D, "stride_c0": bs * Hk * D, "stride_c1": Hk * D,
              "stride_c2": D, "stride_s0": bs * Hk, "stride_s1": Hk, "stride_bt": 4096 // bs if paged else 1,
              "window_left": -1}
        out.append(_v(f"decode D={D} rows={rows} {TL_NAME[dt]} paged={paged} int8={int8} softcap={cap_} "
                      f"split={not direct}", decode_attention.decode_kernel,
                      {"q_ptr": P[dt], "kc_ptr": P[cdt], "vc_ptr": P[cdt], "lens_ptr": P[torch.int32],
                       "bt_ptr": P[torch.int32], "ks_ptr": P[f32], "vs_ptr": P[f32], "out_ptr": P[dt],
                       "po_ptr": P[f32], "plse_ptr": P[f32],
                       **_ints("Sq", "Hq", "D", "GROUP", "split_size", "num_splits", "block_size", "stride_qb",
                               "stride_qs", "stride_qh", "stride_c0", "stride_c1", "stride_c2", "stride_s0",
                               "stride_s1", "stride_bt"),
                       "sm_scale": "fp32", "softcap": "fp32", "window_left": "i32"},
                      {"PAGED": paged, "INT8": int8, "SOFTCAP": cap_, "DIRECT": direct, "DOT_PREC": c["DOT_PREC"],
                       "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_D": c["BLOCK_D"],
                       "ROW_BLOCKS": c["ROW_BLOCKS"], "ALIGN8": True}, c["num_warps"], c["num_stages"], vals=dv))
    for D in (128, 256):
        out.append(_v(f"decode merge D={D} splits<=64", decode_attention.merge_kernel,
                      {"po_ptr": P[f32], "plse_ptr": P[f32], "out_ptr": P[bf], **_ints("D", "num_splits")},
                      {"BLOCK_S": decode_attention.MAX_SPLITS, "BLOCK_D": pow2(D)}, vals={"D": D, "num_splits": 4}))
    # prefill attention: every padded head dim (80 and 96 run as 128), bf16 and fp32, varlen, softcap.
    # D=120 runs as 128 without the JIT's divisibility-16 hint on D and the head strides (ALIGN8 path).
    for D, dt, varlen, cap_ in ((64, bf, False, False), (120, bf, False, False), (128, bf, False, False), (128, bf, True, True),
                                (256, bf, False, False), (256, bf, True, False), (128, f32, False, False), (128, f32, True, True),
                                (256, f32, False, False)):
        c = attention.config(D, dt, cap)
        # Hq 32, Hk 8; batched [2, 4096, H, D] or packed [8192, H, D] (batch strides 0).
        S, T, Hq, Hk = 4096, 8192, 32, 8
        av = {"Sq": T if varlen else S, "Sk": T if varlen else S, "Hq": Hq, "D": D, "GROUP": Hq // Hk,
              "stride_qb": 0 if varlen else S * Hq * D, "stride_qs": Hq * D, "stride_qh": D,
              "stride_kb": 0 if varlen else S * Hk * D, "stride_ks": Hk * D, "stride_kh": D,
              "stride_vb": 0 if varlen else S * Hk * D, "stride_vs": Hk * D, "stride_vh": D,
              "stride_ob": 0 if varlen else S * Hq * D, "stride_os": Hq * D, "stride_oh": D,
              "stride_lb": 0 if varlen else Hq * S, "stride_lh": T if varlen else S,
              "window_left": -1, "window_right": 0}
        strides = ["stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb",
                   "stride_vs", "stride_vh", "stride_ob", "stride_os", "stride_oh", "stride_lb", "stride_lh"]
        out.append(_v(f"attention D={D} {TL_NAME[dt]} varlen={varlen} softcap={cap_}", attention.attn_fwd_kernel,
                      {"q_ptr": P[dt], "k_ptr": P[dt], "v_ptr": P[dt], "out_ptr": P[dt], "lse_ptr": P[f32],
                       "cuq_ptr": P[torch.int32], "cuk_ptr": P[torch.int32],
                       **_ints("Sq", "Sk", "Hq", "D", "GROUP", *strides),
                       "sm_scale": "fp32", "softcap": "fp32", "window_left": "i32", "window_right": "i32"},
                      {"VARLEN": varlen, "SOFTCAP": cap_, "DOT_PREC": attention.dot_precision(dt),
                       "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_D": c["BLOCK_D"], "ALIGN8": True},
                      c["num_warps"], c["num_stages"], vals=av))
    out += _linear_variants(cap)
    return out


def _linear_variants(cap: int) -> list[dict]:
    """int4/int8 linear variants (from their modules, where present)."""
    import importlib

    out = []
    for mod in ("int4_linear", "int8_linear"):
        try:
            m = importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError:
            continue
        out += m.variants(cap, P)
    return out
