"""llmkern's Triton kernels (installed as `llmkern.triton_kernels`, never as top-level `triton_kernels`).

Importing this package requires triton; the `triton` backend is available only where it imports and
a CUDA GPU (or TRITON_INTERPRET=1) is present. Kernels arrive with the Triton issue.
"""
import triton  # noqa: F401  (fail the import where triton is missing: the backend is then unavailable)
