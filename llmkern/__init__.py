"""llmkern: hand-written CPU/CUDA/Triton kernels for LLM inference, as torch ops and drop-in modules."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers torch.ops.llmkern.*)
from ._info import info  # noqa: E402

__all__ = ["ops", "nn", "models", "info", "generate", "patch", "unpatch", "__version__"]

_LAZY = {"generate": "generate", "patch": "patch", "unpatch": "unpatch", "load_gguf": "load_gguf"}


def __getattr__(name):
    # The runtime (and its gguf/tokenizer imports) loads only when first used.
    if name in _LAZY:
        from . import models

        return getattr(models, _LAZY[name])
    if name in ("nn", "models"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'llmkern' has no attribute {name!r}")
