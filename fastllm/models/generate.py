"""Autoregressive sampling with the model's KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extends input_ids (B, T0) by up to ``max_new_tokens`` sampled tokens: (B, T0 + new).

    A row that produced ``eos_id`` continues with ``eos_id``; sampling stops early once every row has.
    The model runs in eval mode and is returned to its previous mode.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq) with seq >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    was_training = model.training
    model.eval()
    try:
        B, T0 = input_ids.shape
        cache = model.init_cache(B, T0 + max_new_tokens)
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = model(input_ids, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
                finished |= next_ids == eos_id
            tokens.append(next_ids[:, None])
            if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
                break
            logits = model(next_ids[:, None], cache=cache)[:, -1]
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)
