"""Config-driven language models: a registry of architectures, generation, Hugging Face interop.

    config = config_from_dict({"arch": "llama", "vocab_size": 256, "dim": 128, "n_layers": 2, "n_heads": 4})
    model = build_model(config)
    logits = model(input_ids)                       # (B, T) -> (B, T, vocab)
    out = generate(model, prompt_ids, max_new_tokens=50, temperature=0.8, top_k=50)
"""

from fastllm.models.apertus import ApertusConfig, ApertusLM
from fastllm.models.generate import generate, sample_next
from fastllm.models.hf import from_pretrained, save_pretrained
from fastllm.models.llama import LlamaConfig, LlamaLM
from fastllm.models.registry import build_model, config_from_dict, model_names, register_model
from fastllm.models.transformer import TransformerConfig, TransformerLM

__all__ = ["ApertusConfig", "ApertusLM", "LlamaConfig", "LlamaLM", "TransformerConfig", "TransformerLM",
           "build_model", "config_from_dict", "from_pretrained", "generate", "model_names", "register_model",
           "sample_next", "save_pretrained"]
