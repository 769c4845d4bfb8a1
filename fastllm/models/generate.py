"""Autoregressive sampling with the model's KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import numbers
import warnings

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted to a row maximum of 0 first, so that a tiny temperature cannot overflow to inf - inf = nan.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
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


SMALLEST_SPAN = 64  # attention spans of graphed decoding: powers of two from here, and the capacity


def attention_spans(first_end: int, capacity: int) -> list[int]:
    """The spans decoding steps attend over, ascending: each power of two from SMALLEST_SPAN that a step
    ending at ``first_end`` or later can use, then ``capacity``."""
    spans, span = [], SMALLEST_SPAN
    while span < capacity:
        if span >= first_end:
            spans.append(span)
        span *= 2
    return spans + [capacity]


class _GraphedStep:
    """model(ids, cache=cache) for one token as CUDA graphs, captured once and replayed per token, so
    that small-batch decoding is not bound by Python and kernel launches (some 20 kernels per layer).
    For caches whose step has fixed shapes and buffers (``cache.step_state()`` is not None) and room
    for two more tokens: the warm-up and the capture each count one, and both are undone. A cache with
    keys gets one graph per attention span (``attention_spans``), all in one memory pool, and each
    step replays the smallest span that holds its position."""

    def __init__(self, model, cache, ids: torch.Tensor):
        self.cache, self.ids = cache, ids.clone()
        self.pool = torch.cuda.graph_pool_handle()
        full = cache.span
        spans = [None] if full is None else attention_spans(cache.pos + ids.shape[1], full)
        try:
            self.graphs = {span: self._capture(model, span) for span in spans}
        finally:
            cache.span = full

    def _capture(self, model, span: int | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        cache = self.cache
        saved, pos = [t.clone() for t in cache.step_state()], cache.pos
        cache.span = span
        try:
            # Warm up on a side stream first (lazy initialisation, autotuning), as capture requires.
            side = torch.cuda.Stream(self.ids.device)
            side.wait_stream(torch.cuda.current_stream(self.ids.device))
            with torch.cuda.stream(side):
                model(self.ids, cache=cache)
            torch.cuda.current_stream(self.ids.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = model(self.ids, cache=cache)[:, -1]
            return graph, logits
        finally:
            for state, before in zip(cache.step_state(), saved):
                state.copy_(before)
            cache.pos = pos

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The last position's logits (a buffer that a later call may overwrite)."""
        self.cache.check_room(*ids.shape)  # the replay runs kernels only: the bookkeeping is done here
        end = self.cache.pos + ids.shape[1]
        span = next(s for s in self.graphs if s is None or s >= end)
        graph, logits = self.graphs[span]
        self.ids.copy_(ids)
        graph.replay()
        self.cache.advance(ids.shape[1])
        return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool = True) -> torch.Tensor:
    """Extends input_ids (B, T0) by up to ``max_new_tokens`` sampled tokens: (B, T0 + new).

    A row that produced ``eos_id`` continues with ``eos_id``; sampling stops early once every row has.
    The model runs in eval mode and is returned to its previous mode. With ``cuda_graph``, on a CUDA
    device, the decoding step is replayed as a CUDA graph where the model's cache allows fixed-shape
    steps: a recurrent state (Mamba), a KV cache under dense attention (attending under a mask over
    the cache's first 64, 128, ... slots, whichever is the smallest that holds the position).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq) with seq >= 1, got shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    was_training = model.training
    model.eval()
    try:
        B, T0 = input_ids.shape
        graphed = cuda_graph and input_ids.is_cuda and max_new_tokens > 1
        cache = model.init_cache(B, T0 + max_new_tokens, fixed_shape=graphed)
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = model(input_ids, cache=cache)[:, -1]
        step_model = lambda ids: model(ids, cache=cache)[:, -1]  # noqa: E731
        if graphed and cache.step_state() is not None:
            try:
                step_model = _GraphedStep(model, cache, input_ids[:, -1:])
            except RuntimeError as error:  # slower, never wrong: the step runs eagerly
                warnings.warn(f"decoding without a CUDA graph, its capture failed: {error}", stacklevel=2)
        for step in range(max_new_tokens):
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
                finished |= next_ids == eos_id
            tokens.append(next_ids[:, None])
            if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
                break
            logits = step_model(next_ids[:, None])
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)
