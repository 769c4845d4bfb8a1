"""Model building blocks: norms, rotary embeddings, pluggable attention, MLPs, the decoder block, KV cache."""

from fastllm.nn.attention import (Attention, attention_names, get_attention, is_dense_attention, register_attention,
                                 sdpa_attention)
from fastllm.nn.block import DecoderBlock
from fastllm.nn.cache import KVCache
from fastllm.nn.mlp import XIELU, SwiGLU, XieluMLP
from fastllm.nn.norm import RMSNorm
from fastllm.nn.rope import RotaryEmbedding, apply_rotary, positions_from_doc_ids, rotary_tables

__all__ = ["Attention", "DecoderBlock", "KVCache", "RMSNorm", "RotaryEmbedding", "SwiGLU", "XIELU", "XieluMLP",
           "apply_rotary", "attention_names", "get_attention", "is_dense_attention", "positions_from_doc_ids",
           "register_attention", "rotary_tables", "sdpa_attention"]
