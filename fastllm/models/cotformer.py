"""CoTFormer (arXiv 2310.10845): a transformer whose middle layer group runs ``n_repeat`` times, each
repeat attending to the keys and values of all earlier repeats, like a chain of thought at the
token level.

Layers: ``n_begin`` blocks, then the middle group (n_layers - n_begin - n_end blocks) applied
``n_repeat`` times, then ``n_end`` blocks. In repeat r a middle layer's query at token t sees the keys
and values that layer produced in repeats 0..r for tokens 0..t (of the same document). LN-CoTFormer:
``repeat_norm`` adds an RMSNorm after each repeat and ``depth_embedding`` a learned vector (zero at
initialisation) before each. With n_repeat = 1 and neither option, it is the plain transformer.

Adaptive CoTFormer (``adaptive``, a mixture of repeats): before each repeat r >= 1 a router scores the
tokens still going on and only the top ``capacity[r]`` fraction of each sequence continues; a token
that stops keeps its state and has no keys in the repeats it skips. A continuing token adds
sigmoid(score) times the repeat's update, which trains the router. Training draws random non-increasing
capacities every step so that one model serves every budget; at inference ``set_capacities`` fixes
them, ``macs_per_token`` counts what they cost and ``capacity_sweep`` reports perplexity against it.
Routing ranks whole sequences, so the adaptive model runs without a KV cache. Each repeat gathers the
tokens that run it, computes only those (its attention sees the keys of the tokens that ran each
earlier repeat) and scatters their new states back, so compute follows the capacities, as
``macs_per_token`` counts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.models.registry import register_model
from fastllm.models.transformer import TransformerConfig, TransformerLM
from fastllm.nn import DecoderBlock, KVCache, RMSNorm, apply_rotary, rotary_tables
from fastllm.nn.attention import attention_mask


@dataclass
class CoTFormerConfig(TransformerConfig):
    ARCH: ClassVar[str] = "cotformer"

    n_begin: int = 1
    n_end: int = 1
    n_repeat: int = 2
    repeat_norm: bool = False
    depth_embedding: bool = False
    adaptive: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_begin", "n_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.n_repeat, bool) or not isinstance(self.n_repeat, int) or self.n_repeat <= 0:
            raise ValueError(f"n_repeat must be a positive integer, got {self.n_repeat!r}")
        if self.n_begin + self.n_end >= self.n_layers:
            raise ValueError(f"n_begin ({self.n_begin}) + n_end ({self.n_end}) must leave at least one of the "
                             f"n_layers ({self.n_layers}) for the repeated middle group")
        for name in ("repeat_norm", "depth_embedding", "adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def n_middle(self) -> int:
        return self.n_layers - self.n_begin - self.n_end


def repeat_mask(Tq: int, Tk: int, repeats: int, doc_ids: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """(B or 1, 1, Tq, repeats * Tk) booleans: query t (the last Tq of Tk positions) sees key (r', t') of
    every repeat r' when t' <= t and, with ``doc_ids``, t' is in t's document."""
    mask = attention_mask(Tq, Tk, causal=True, doc_ids=doc_ids, device=device)
    if mask is None:  # one query, no documents: it sees every cached key
        mask = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=device)
    return mask.repeat(1, 1, 1, repeats)


def routed_mask(q_positions: torch.Tensor, key_positions: list[torch.Tensor | None], T: int,
                doc_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, n, sum of the repeats' key counts) booleans for routed repeats: the query at sequence
    position q_positions[b, i] sees the keys of every earlier repeat (key_positions: their tokens'
    positions, None for all T) at positions up to its own and, with ``doc_ids``, in its document."""
    B = q_positions.shape[0]
    everyone = torch.arange(T, device=q_positions.device).expand(B, T)
    k_positions = torch.cat([everyone if p is None else p for p in key_positions], dim=1)
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if doc_ids is not None:
        mask &= doc_ids.gather(1, q_positions)[:, :, None] == doc_ids.gather(1, k_positions)[:, None, :]
    return mask[:, None]


def _take(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The rows of x (B, T, D) at positions (B, n); all of x for None."""
    return x if positions is None else x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def _take_rows(table: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """RoPE table rows (T, D) or (B, T, D) at positions (B, n)."""
    if positions is None:
        return table
    return _take(table.expand(positions.shape[0], -1, -1) if table.dim() == 2 else table, positions)


def _active_mask(positions: torch.Tensor | None, shape, device) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    return mask if positions is None else torch.zeros_like(mask).scatter_(1, positions, True)


class _LayerOffsetCache:
    """A KV cache seen by a block whose cache slot is its layer index plus ``offset``."""

    fixed_shape = False

    def __init__(self, cache: KVCache, offset: int):
        self.cache, self.offset = cache, offset

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(layer + self.offset, k, v)


class CoTFormerLM(TransformerLM):
    def __init__(self, config: CoTFormerConfig):
        super().__init__(config)
        c = config
        self.repeat_norms = nn.ModuleList(RMSNorm(c.dim, c.norm_eps) for _ in range(c.n_repeat)) \
            if c.repeat_norm else None
        self.depth_embed = nn.Parameter(torch.zeros(c.n_repeat, c.dim)) if c.depth_embedding else None
        # routers[r - 1] picks the tokens that go on to repeat r.
        self.routers = nn.ModuleList(nn.Linear(c.dim, 1) for _ in range(c.n_repeat - 1)) if c.adaptive else None
        self.capacities: list[float] | None = None
        self.last_active: list[torch.Tensor] = []

    def set_capacities(self, capacities: list[float] | None) -> None:
        """Fraction of each sequence's tokens that runs repeat r, for r = 0..n_repeat-1 (capacities[0] = 1,
        non-increasing); None: random capacities in training, all tokens in evaluation."""
        if capacities is not None:
            capacities = [float(c) for c in capacities]
            check_capacities(capacities, self.config.n_repeat)
        self.capacities = capacities

    def _current_capacities(self) -> list[float]:
        n = self.config.n_repeat
        if self.capacities is not None:
            return self.capacities
        if not self.training:
            return [1.0] * n
        # Random budgets: capacities of the later repeats drawn uniformly, sorted to be non-increasing.
        draws = torch.rand(n - 1).sort(descending=True).values.tolist()
        return [1.0] + draws

    def _route(self, r: int, x: torch.Tensor, positions: torch.Tensor | None, capacity: float):
        """(gate (B, n, 1), positions (B, n), ascending): of the tokens at ``positions`` (None: all), the
        ceil(capacity * T) with the top router scores go on to repeat r, with gate sigmoid(score)."""
        T = x.shape[1]
        candidates = _take(x, positions)
        scores = self.routers[r - 1](candidates).squeeze(-1).float()
        # Shrunk by a relative 1e-9 first: capacity * T may lie a rounding error above a whole number
        # (0.07 * 100 = 7.000000000000001), which ceil would round up to one token too many.
        keep = min(max(1, math.ceil(capacity * T * (1 - 1e-9))), candidates.shape[1])
        top_scores, top = scores.topk(keep, dim=1)
        chosen = top if positions is None else positions.gather(1, top)
        chosen, order = chosen.sort(dim=1)  # time order, which the attention mask relies on
        gate = torch.sigmoid(top_scores.gather(1, order)).unsqueeze(-1).to(x.dtype)
        return gate, chosen

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if getattr(self, "depth_embed", None) is not None:
            self.depth_embed.zero_()

    def _middle_block(self, block: DecoderBlock, x: torch.Tensor, cos, sin, doc_ids, past: list, cache,
                      cache_layer: int, positions: torch.Tensor | None) -> torch.Tensor:
        """A middle block in repeat len(past) on the tokens at ``positions`` (B, n) of the sequence (None:
        all of them); x, cos and sin hold those tokens. ``past``: this layer's (k, v, positions) of the
        earlier repeats, to which this repeat's are appended."""
        attn = block.attn
        B, T, _ = x.shape
        h = block.attn_norm(x)
        q = attn.q_proj(h).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_layer, k, v)
        past.append((k, v, positions))
        if len(past) == 1:  # the first repeat is plain causal attention (the model's attention function)
            out = attn.attention(q, k, v, causal=True, doc_ids=doc_ids)
        else:
            keys = torch.cat([kv[0] for kv in past], dim=2)
            values = torch.cat([kv[1] for kv in past], dim=2)
            if all(p is None for _, _, p in past):
                mask = repeat_mask(T, k.shape[2], len(past), doc_ids, x.device)
            else:
                mask = routed_mask(positions, [p for _, _, p in past], past[0][0].shape[2], doc_ids)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 enable_gqa=attn.n_heads != attn.n_kv_heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim))
        return x + block.mlp(block.mlp_norm(x))

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: KVCache | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        cos, sin = rotary_tables(self.rope, input_ids, doc_ids, cache)
        x = self.embed(input_ids)
        begin = self.layers[:c.n_begin]
        middle = self.layers[c.n_begin:c.n_begin + c.n_middle]
        end = self.layers[c.n_begin + c.n_middle:]
        for layer in begin:
            x = layer(x, cos, sin, doc_ids, cache)
        past = [[] for _ in middle]
        routed = self.routers is not None and c.n_repeat > 1
        if routed and cache is not None:
            raise ValueError("the adaptive CoTFormer routes over whole sequences and cannot use a KV cache")
        capacities = self._current_capacities() if routed else None
        positions, gate = None, None  # the tokens that run the current repeat (None: all)
        self.last_active = []
        for r in range(c.n_repeat):
            if routed and r > 0:
                gate, positions = self._route(r, x, positions, capacities[r])
            self.last_active.append(_active_mask(positions, x.shape[:2], x.device))
            # Only the tokens that run this repeat are computed: gather them, then scatter back.
            x_in = _take(x, positions)
            h = x_in if self.depth_embed is None else x_in + self.depth_embed[r].to(x.dtype)
            cos_r, sin_r = _take_rows(cos, positions), _take_rows(sin, positions)
            for j, layer in enumerate(middle):
                h = self._middle_block(layer, h, cos_r, sin_r, doc_ids, past[j], cache,
                                       c.n_begin + r * c.n_middle + j, positions)
            if self.repeat_norms is not None:
                h = self.repeat_norms[r](h)
            if positions is None:
                x = h
            else:  # a routed token adds its gated update; the others keep their state
                x = x.scatter(1, positions[..., None].expand_as(h), x_in + gate * (h - x_in))
        end_cache = None if cache is None else _LayerOffsetCache(cache, (c.n_repeat - 1) * c.n_middle)
        for layer in end:
            x = layer(x, cos, sin, doc_ids, end_cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.output(x, labels)

    def init_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None,
                   fixed_shape: bool = False) -> KVCache:
        """One cache slot per block application: n_begin + n_repeat * n_middle + n_end. The repeats'
        masks slice the cache up to the new tokens, so ``fixed_shape`` is never granted."""
        c, weight = self.config, self.embed.weight
        return KVCache(c.n_begin + c.n_repeat * c.n_middle + c.n_end, batch_size, c.n_kv_heads, max_seq_len,
                       c.head_dim, device=weight.device if device is None else device,
                       dtype=weight.dtype if dtype is None else dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per multiply-accumulate of every block application (the middle
        group n_repeat times) and of the output projection, plus attention, whose middle layers see
        r + 1 repeats' keys in repeat r."""
        c = self.config
        per_block = sum(p.numel() for p in self.layers[0].parameters() if p.dim() >= 2)
        applications = c.n_begin + c.n_end + c.n_repeat * c.n_middle
        attention_keys = c.n_begin + c.n_end + c.n_middle * c.n_repeat * (c.n_repeat + 1) / 2
        return (6.0 * (applications * per_block + c.vocab_size * c.dim)
                + 12.0 * attention_keys * c.n_heads * c.head_dim * seq_len)

    def macs_per_token(self, seq_len: int, capacities: list[float] | None = None) -> float:
        """Forward multiply-accumulates per token when repeat r runs on a capacities[r] fraction of the
        tokens (default all): block matmuls, routers, attention over the visible keys, output projection."""
        c = self.config
        capacities = [1.0] * c.n_repeat if capacities is None else [float(x) for x in capacities]
        check_capacities(capacities, c.n_repeat)
        per_block = sum(p.numel() for p in self.layers[0].parameters() if p.dim() >= 2)
        attention = 2 * c.n_heads * c.head_dim * seq_len / 2  # scores and values over a causal half
        macs = (c.n_begin + c.n_end) * (per_block + attention) + c.vocab_size * c.dim
        for r, capacity in enumerate(capacities):
            visible = sum(capacities[: r + 1])  # keys of the earlier repeats, as fractions of the tokens
            macs += capacity * c.n_middle * (per_block + attention * visible)
            macs += c.dim * capacity if r > 0 and self.routers is not None else 0.0
        return float(macs)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"depth_embed"} if self.depth_embed is not None else set())


def check_capacities(capacities: list[float], n_repeat: int) -> None:
    if len(capacities) != n_repeat:
        raise ValueError(f"capacities needs one fraction per repeat ({n_repeat}), got {len(capacities)}")
    if capacities[0] != 1.0:
        raise ValueError(f"every token runs the first repeat: capacities[0] must be 1, got {capacities[0]}")
    if any(not 0.0 < x <= 1.0 for x in capacities) or any(b > a for a, b in zip(capacities, capacities[1:])):
        raise ValueError(f"capacities must lie in (0, 1] and not increase, got {capacities}")


@torch.no_grad()
def capacity_sweep(model: CoTFormerLM, batches, capacity_settings) -> list[dict]:
    """Perplexity against forward multiply-accumulates per token for each capacity setting.

    ``batches``: (input_ids, labels) pairs or loader batches with those keys (labels -100: no loss), read
    once per setting (a one-shot iterator is read into a list first).
    Returns one {"capacities", "macs_per_token", "perplexity"} per setting; restores the model's mode
    and capacities.
    """
    if iter(batches) is batches:  # a one-shot iterator: every setting must see the same batches
        batches = list(batches)
    was_training, previous = model.training, model.capacities
    model.eval()
    results = []
    try:
        for capacities in capacity_settings:
            model.set_capacities(capacities)
            total, count, seq_len = 0.0, 0, 0
            for batch in batches:
                ids, labels = (batch["input_ids"], batch["labels"]) if isinstance(batch, dict) else batch
                doc_ids = batch.get("doc_ids") if isinstance(batch, dict) else None
                total += model(ids, doc_ids, labels=labels).item()
                count += int((labels != -100).sum())
                seq_len = ids.shape[1]
            if count == 0:
                raise ValueError("capacity_sweep: the batches hold no labelled tokens (labels other than -100)")
            results.append({"capacities": list(model.capacities),
                            "macs_per_token": model.macs_per_token(seq_len, model.capacities),
                            "perplexity": math.exp(total / max(count, 1))})
    finally:
        model.capacities = previous
        model.train(was_training)
    return results


register_model("cotformer", CoTFormerConfig, CoTFormerLM)

__all__ = ["CoTFormerConfig", "CoTFormerLM", "capacity_sweep", "repeat_mask", "routed_mask"]
