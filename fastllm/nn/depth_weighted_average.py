"""DenseFormer's depth-weighted averages (arXiv 2402.02622) over block outputs kept in preallocated buffers.

With x_0 the embedding output and x_i the output of block i, the input of block i + 1 is
y_i = sum_j alpha_ij x_j over j <= i with j = i (mod dilation), when i is a multiple of ``period``;
otherwise y_i = x_i. Each residue r = j mod dilation has one buffer (n_r, *x.shape), allocated once
per forward pass; x_j is copied into slot j // dilation of buffer j mod dilation, so a DWA reads the
prefix of one buffer: nothing is stacked or concatenated, and memory is O(depth).
"""

from __future__ import annotations

import torch
from torch import nn

from fastllm.ops import depth_weighted_average, depth_weighted_average_backward


class _BufferedDWA(torch.autograd.Function):
    """sum_k weights[k] * buffer[k] over the first K slots, with the gradient of slot k sent to states[k].

    ``states`` are the tensors that were copied into buffer[:K]; they are inputs only so that autograd
    routes their gradients. The buffer is kept on ctx rather than saved: its later slots are written
    after this call (bumping its version counter), but slots < K never change again.
    """

    @staticmethod
    def forward(ctx, weights, buffer, *states):
        used = buffer[: len(states)]
        ctx.used = used
        ctx.save_for_backward(weights)
        return depth_weighted_average(used, weights)

    @staticmethod
    def backward(ctx, grad_out):
        (weights,) = ctx.saved_tensors
        grad_states, grad_weights = depth_weighted_average_backward(grad_out, ctx.used, weights)
        return (grad_weights, None, *grad_states.unbind(0))


def dwa_positions(n_layers: int, period: int) -> list[int]:
    """Block numbers (1-based) followed by a DWA: the multiples of ``period``."""
    return [i for i in range(1, n_layers + 1) if i % period == 0]


class DepthWeightedAverages(nn.Module):
    """The DWA weights of a DenseFormer with ``n_layers`` blocks, and the per-forward buffers.

    weights[str(i)] (i // dilation + 1,) weighs x_{i mod dilation}, ..., x_{i - dilation}, x_i for the
    DWA after block i; at initialisation it is (0, ..., 0, 1), the identity (a plain transformer).
    """

    def __init__(self, n_layers: int, dilation: int = 1, period: int = 1):
        super().__init__()
        for name, value in (("n_layers", n_layers), ("dilation", dilation), ("period", period)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.n_layers, self.dilation, self.period = n_layers, dilation, period
        self.positions = dwa_positions(n_layers, period)
        self.weights = nn.ParameterDict(
            {str(i): nn.Parameter(torch.empty(i // dilation + 1)) for i in self.positions})
        # The last block output each residue's buffer must keep (those past it are never read).
        self.last_read = {}
        for i in self.positions:
            self.last_read[i % dilation] = i
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in self.weights.values():
            w.zero_()
            w[-1] = 1.0

    def start(self, x0: torch.Tensor) -> "DWAPass":
        """Buffers for one forward pass whose embedding output is ``x0``."""
        return DWAPass(self, x0)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, dilation={self.dilation}, period={self.period}"


class DWAPass:
    """One forward pass: ``after_block(i, x_i)`` stores x_i and returns block i + 1's input y_i."""

    def __init__(self, dwa: DepthWeightedAverages, x0: torch.Tensor):
        self.dwa = dwa
        self.buffers = {r: x0.new_empty((last // dwa.dilation + 1, *x0.shape)) for r, last in dwa.last_read.items()}
        self.stored: dict[int, list[torch.Tensor]] = {r: [] for r in self.buffers}
        self._store(0, x0)

    def _store(self, i: int, x: torch.Tensor) -> None:
        r = i % self.dwa.dilation
        if r in self.buffers and i <= self.dwa.last_read[r]:
            # A detached source: the buffer stays out of the autograd graph (the DWA routes gradients).
            self.buffers[r][i // self.dwa.dilation].copy_(x.detach())
            self.stored[r].append(x)

    def after_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        self._store(i, x)
        if i % self.dwa.period:
            return x
        r = i % self.dwa.dilation
        # The op takes fp32 weights; a model cast to bf16 holds them in bf16.
        weights = self.dwa.weights[str(i)].float()
        return _BufferedDWA.apply(weights, self.buffers[r], *self.stored[r])
