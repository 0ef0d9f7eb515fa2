"""llmkern: hand-written CPU/CUDA/Triton kernels for LLM inference, as torch ops and drop-in modules."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers torch.ops.llmkern.*)
from ._info import info  # noqa: E402

__all__ = ["ops", "info", "__version__"]
