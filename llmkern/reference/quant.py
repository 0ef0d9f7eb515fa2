"""Reference (pure PyTorch) implementation; see llmkern/ops for the semantics."""
import torch



def quantize_int8(w, group_size):
    raise NotImplementedError


def dequantize_int8(w, scale):
    raise NotImplementedError


def quantize_int4(w, group_size):
    raise NotImplementedError


def dequantize_int4(qweight, scales, offsets):
    raise NotImplementedError


def pack_int4(q):
    raise NotImplementedError


def unpack_int4(packed):
    raise NotImplementedError


def quantize_rows_int8(x):
    raise NotImplementedError
