"""fastllm: kernel-first performance library for LLM pretraining research."""
__version__ = "0.1.0"
