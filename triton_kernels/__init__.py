"""Triton kernels, installed as fastllm.triton_kernels."""
