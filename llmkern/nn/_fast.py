"""The eager fast path of llmkern.nn's hot modules (see `Op.run_trusted`).

A module calls its op through the full registered op (dispatcher + argument checks) the first time
and whenever one of its tensors is replaced (assignment, .to(), load_state_dict); once they passed,
later calls only re-check the activation
(cheap attribute tests) and call `run_trusted`, skipping ~5-10 us of per-call overhead that adds up
over the hundreds of op calls of a decode step. Under torch.compile the registered op is always used.
"""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def plain_activation(x, last_dim: int, device: torch.device) -> bool:
    """x is a plain float tensor [..., last_dim] on `device`: what the op checks about an activation, and one
    autograd does not track (a tracked x takes the registered op, whose backward raises: see _registry)."""
    return (type(x) is torch.Tensor and x.dtype in FLOATS and x.dim() >= 1 and x.shape[-1] == last_dim
            and x.device == device and not (x.requires_grad and torch.is_grad_enabled()))
