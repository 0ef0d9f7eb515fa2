"""The C++ unpackers of released CPU weights as torch custom ops, so that `torch.compile` can trace them.

A prepared Int8Linear / Int4Linear may hold its weights in a packed layout alone (nn/linear.py `_Releasable`) and
rebuild the canonical tensors on demand. In eager use that rebuild puts them back into the module; while dynamo
traces a module it can change no module state, so the traced graph unpacks them itself (on every call of the
compiled function), which needs ops it can trace: these, with fake implementations giving the shapes.
"""
import torch

from .. import _backends


@torch.library.custom_op("llmkern::cpu_int8_unpack", mutates_args=(), schema="(Tensor packed, int N, int K) -> Tensor")
def cpu_int8_unpack(packed, N, K):
    """weight int8 [N, K]: the canonical weight the int8 packed decode layout `packed` (uint8, with its header)
    was packed from, bit for bit (csrc/include/llmkern/cpu/int8_linear_pack_layout.h unpack_weights)."""
    weight = torch.empty(N, K, dtype=torch.int8)
    _backends.cpu_module().int8_linear_unpack(packed.data_ptr(), weight.data_ptr(), N, K)
    return weight


@cpu_int8_unpack.register_fake
def _(packed, N, K):
    return packed.new_empty((N, K), dtype=torch.int8)


@torch.library.custom_op("llmkern::cpu_int4_rows16_unpack", mutates_args=(),
                         schema="(Tensor view, int e, int N, int K, int G) -> (Tensor, Tensor, Tensor)")
def cpu_int4_rows16_unpack(view, e, N, K, G):
    """(qweight uint8 [N, K // 2], scales, offsets float32 [N, K // G]): the canonical tensors the int4 rows16
    layout `view` (E = e bytes per scale) was packed from, bit for bit (int4_linear_rows16_unpack)."""
    qweight = torch.empty(N, K // 2, dtype=torch.uint8)
    scales = torch.empty(N, K // G, dtype=torch.float32)
    offsets = torch.empty(N, K // G, dtype=torch.float32)
    _backends.cpu_module().int4_linear_rows16_unpack(view.data_ptr(), N, K, G, e, qweight.data_ptr(),
                                                     scales.data_ptr(), offsets.data_ptr())
    return qweight, scales, offsets


@cpu_int4_rows16_unpack.register_fake
def _(view, e, N, K, G):
    return (view.new_empty((N, K // 2), dtype=torch.uint8), view.new_empty((N, K // G), dtype=torch.float32),
            view.new_empty((N, K // G), dtype=torch.float32))
