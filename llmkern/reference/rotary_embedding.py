"""Reference (pure PyTorch) implementation; see llmkern/ops for the semantics."""
import torch



def rotary_embedding(q, k, positions, cos_sin_cache, interleaved):
    raise NotImplementedError
