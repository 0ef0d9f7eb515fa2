"""Reference (pure PyTorch) implementation; see llmkern/ops for the semantics."""
import torch



def decode_attention(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
    raise NotImplementedError
