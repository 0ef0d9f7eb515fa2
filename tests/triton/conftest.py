"""tests/triton: Triton kernels on a GPU, or under the interpreter on the CPU in a child process.

Nothing here sets TRITON_INTERPRET: the rest of the suite must run without it. The kernel tests
(test_k_*.py) run directly where a GPU exists; without one, test_interpreter.py re-runs them in a
child pytest with TRITON_INTERPRET=1 (set before triton is imported there). Every module starts with
pytest.importorskip("triton"), so the folder skips cleanly where the `triton` extra is not installed.
"""
