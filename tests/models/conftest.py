"""Fixtures for the runtime tests: the real SmolLM2 GGUF, loaded once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm_path():
    from llmkern.models.gguf_loader import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the default model is not installed: {e}")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct Q4_1, loaded once."""
    from llmkern.models import load_gguf
    return load_gguf(smollm_path, progress=False, fuse=False)  # HF module names, for structure tests


@pytest.fixture(scope="session")
def smollm_reader(smollm_path):
    """The real file as open_gguf parses it (llmkern.formats.gguf_file.GGUFFile)."""
    from llmkern.models.gguf_loader import open_gguf
    return open_gguf(smollm_path)
