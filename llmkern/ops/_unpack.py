"""The C++ unpackers of released CPU weights, callable eagerly and as torch custom ops that `torch.compile` can
trace.

A prepared Int8Linear / Int4Linear may hold its weights in a packed layout alone (nn/_releasable.py) and rebuild
the canonical tensors on demand. In eager use that rebuild puts them back into the module; while dynamo traces a
module it can change no module state, so the traced graph unpacks them itself (on every call of the compiled
function), which needs ops it can trace: the custom ops below, with fake implementations giving the shapes.
Eager callers use the plain functions (`int8_unpack`, ...), which call the C++ code directly and the custom op
only while compiling: a custom op's first eager call costs ~1 s (torch's op machinery warming up), which the first
prompt of a model with a tied, released lm_head would pay.
"""
import torch

from .. import _backends


def _int8_unpack(packed, N, K):
    """weight int8 [N, K]: the canonical weight the int8 packed decode layout `packed` (uint8, with its header)
    was packed from, bit for bit (csrc/include/llmkern/cpu/int8_linear_pack_layout.h unpack_weights)."""
    weight = torch.empty(N, K, dtype=torch.int8)
    _backends.cpu_module().int8_linear_unpack(packed.data_ptr(), weight.data_ptr(), N, K)
    return weight


cpu_int8_unpack = torch.library.custom_op("llmkern::cpu_int8_unpack", _int8_unpack, mutates_args=(),
                                          schema="(Tensor packed, int N, int K) -> Tensor")


@cpu_int8_unpack.register_fake
def _(packed, N, K):
    return packed.new_empty((N, K), dtype=torch.int8)


def _int4_canonical_like(t, N, K, G):
    """(qweight uint8 [N, K // 2], scales, offsets float32 [N, K // G]), uninitialized, on t's device (fake tensors
    for fake t)."""
    return (t.new_empty((N, K // 2), dtype=torch.uint8), t.new_empty((N, K // G), dtype=torch.float32),
            t.new_empty((N, K // G), dtype=torch.float32))


def _int4_unpacker(layout: str):
    """The eager function and the torch custom op "llmkern::cpu_int4_<layout>_unpack" of the C++ unpacker
    `int4_linear_<layout>_unpack`: (layout tensor, e, N, K, G) -> (qweight uint8 [N, K // 2], scales, offsets
    float32 [N, K // G]), the canonical tensors that int4 layout (E = e bytes per scale) was packed from, bit for
    bit."""
    def unpack(packed, e, N, K, G):
        out = _int4_canonical_like(packed, N, K, G)
        getattr(_backends.cpu_module(), f"int4_linear_{layout}_unpack")(packed.data_ptr(), N, K, G, e,
                                                                       *(t.data_ptr() for t in out))
        return out

    op = torch.library.custom_op(f"llmkern::cpu_int4_{layout}_unpack", unpack, mutates_args=(),
                                 schema="(Tensor packed, int e, int N, int K, int G) -> (Tensor, Tensor, Tensor)")
    op.register_fake(lambda packed, e, N, K, G: _int4_canonical_like(packed, N, K, G))
    return unpack, op


# rows16 (int4_linear_rows16.h: W4A16 on AVX-512) and the W4A8 layout (int4_linear_w4a8_common.h)
_int4_rows16_unpack, cpu_int4_rows16_unpack = _int4_unpacker("rows16")
_int4_w4a8_unpack, cpu_int4_w4a8_unpack = _int4_unpacker("w4a8")


def _int8_packed_rows(packed, ids, N, K):
    """int8 [n, K]: rows ids (int64 [n], in [0, N)) of the weight the int8 packed decode layout `packed` was packed
    from, bit for bit (the lookup of an embedding tied to a released lm_head: nn/embedding.py)."""
    ids = ids.contiguous()
    out = torch.empty(ids.numel(), K, dtype=torch.int8)
    _backends.cpu_module().int8_linear_gather_rows(packed.data_ptr(), N, K, ids.data_ptr(), ids.numel(),
                                                   out.data_ptr())
    return out


cpu_int8_packed_rows = torch.library.custom_op("llmkern::cpu_int8_packed_rows", _int8_packed_rows, mutates_args=(),
                                               schema="(Tensor packed, Tensor ids, int N, int K) -> Tensor")


@cpu_int8_packed_rows.register_fake
def _(packed, ids, N, K):
    return packed.new_empty((ids.numel(), K), dtype=torch.int8)


def int8_unpack(packed, N, K):
    """See _int8_unpack (the custom op while compiling)."""
    return (cpu_int8_unpack if torch.compiler.is_compiling() else _int8_unpack)(packed, N, K)


def int4_rows16_unpack(view, e, N, K, G):
    """See _int4_rows16_unpack (the custom op while compiling)."""
    return tuple((cpu_int4_rows16_unpack if torch.compiler.is_compiling() else _int4_rows16_unpack)(view, e, N, K, G))


def int4_w4a8_unpack(packed, e, N, K, G):
    """See _int4_w4a8_unpack (the custom op while compiling)."""
    return tuple((cpu_int4_w4a8_unpack if torch.compiler.is_compiling() else _int4_w4a8_unpack)(packed, e, N, K, G))


def int8_packed_rows(packed, ids, N, K):
    """See _int8_packed_rows (the custom op while compiling)."""
    return (cpu_int8_packed_rows if torch.compiler.is_compiling() else _int8_packed_rows)(packed, ids, N, K)
