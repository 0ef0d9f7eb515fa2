"""Reference (pure PyTorch) implementation; see llmkern/ops for the semantics."""
import torch



def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap):
    raise NotImplementedError
