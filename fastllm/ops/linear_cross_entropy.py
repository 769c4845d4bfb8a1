"""Fused linear cross-entropy: the language-model loss without the full logits.

``linear_cross_entropy(hidden, weight, labels)`` equals ``F.cross_entropy(hidden @ weight.T, labels)``
with float32 softmax math. It walks the tokens in chunks: per chunk one matrix product gives the
logits, a kernel turns them in place into per-token losses and the loss gradient, and two more
products give the chunk's gradient for ``hidden`` and its contribution to the gradient of
``weight`` (accumulated in float32). The gradients are therefore computed in the forward, when the
inputs require them, and the backward only scales them by the incoming gradient.

Against the unfused loss of a 50k vocabulary this never holds (tokens x vocab) logits, their
float32 copy, the log-softmax or its gradient: the largest buffer is one chunk of logits in the
inputs' dtype (``chunk_rows`` tokens; by default about 2^27 elements).

Dispatch: CUDA tensors run the Triton row kernel (float16, bfloat16, float32); CPU tensors run it
under the Triton interpreter (``TRITON_INTERPRET=1``), else the same chunked algorithm in torch
ops. float64 and ``FASTLLM_BACKEND=reference`` use ``linear_cross_entropy_reference``.
Labels outside [0, vocab) other than ``ignore_index`` raise on the CPU; on CUDA, where checking them
would synchronise with the host, their tokens' loss is NaN.
"""

from __future__ import annotations

import torch

from fastllm.ops import _backend
from fastllm.ops._validate import check_int, check_same_device, check_same_dtype, check_tensor
from fastllm.ops.linear_cross_entropy_ref import linear_cross_entropy_reference
from fastllm.profiling import nvtx_range

try:
    from fastllm.triton_kernels import cross_entropy as _kernels
except ImportError:  # Triton is an optional dependency
    _kernels = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum")
DEFAULT_CHUNK_ELEMENTS = 1 << 27


def triton_path(logits: torch.Tensor) -> bool:
    if _kernels is None or logits.dtype not in _kernels.KERNEL_DTYPES:
        return False
    return _backend.triton_runs_on(logits, _kernels.INTERPRET)


def implementation(device_type: str) -> str:
    """What the op runs on ``device_type`` ('cpu' or 'cuda') in float16/bfloat16/float32."""
    if _backend.current_backend() == "reference":
        return "reference"
    if _kernels is not None and (device_type == "cuda" or _kernels.INTERPRET):
        return "triton" if device_type == "cuda" else "triton-interpreter"
    return "torch-chunked"


def _cross_entropy_rows_torch(logits, labels, loss, scale, ignore_index: int, compute_grad: bool) -> None:
    """The row kernel in torch ops (same contract as ``cross_entropy_rows_``)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, 0, labels).long()[:, None]
    loss.copy_(torch.where(ignored, 0.0, lse - x.gather(1, safe)[:, 0]))
    if compute_grad:
        grad = torch.softmax(x, dim=1)  # not exp(x - lse): lse's rounding would reach every probability
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        logits.copy_(grad * torch.where(ignored, 0.0, scale)[:, None])


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    labelled = labels[labels != ignore_index]
    if labelled.numel() and (labelled.min() < 0 or labelled.max() >= vocab):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index ({ignore_index}), "
                         f"got values in [{labelled.min().item()}, {labelled.max().item()}]")


@torch.library.custom_op("fastllm::linear_cross_entropy", mutates_args=())
def _forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, mean: bool,
             compute_grad: bool, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d hidden, d loss / d weight); the gradients are empty without ``compute_grad``."""
    if labels.device.type == "cpu":  # checked here, on real tensors, so that tracing never sees it
        _check_label_range(labels, weight.shape[0], ignore_index)
    N = hidden.shape[0]
    n_labelled = (labels != ignore_index).sum(dtype=torch.float32).reshape(1)
    scale = 1.0 / n_labelled if mean else torch.ones_like(n_labelled)
    row_loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = hidden.new_empty(hidden.shape) if compute_grad else hidden.new_empty(0)
    grad_weight = None
    logits_buffer = hidden.new_empty((min(chunk_rows, N), weight.shape[0]))
    for start in range(0, N, chunk_rows):
        rows = slice(start, min(start + chunk_rows, N))
        h = hidden[rows]
        logits = torch.mm(h, weight.t(), out=logits_buffer[: h.shape[0]])
        if triton_path(logits):
            _kernels.cross_entropy_rows_(logits, labels[rows], row_loss[rows], scale, ignore_index, compute_grad)
        else:
            _cross_entropy_rows_torch(logits, labels[rows], row_loss[rows], scale, ignore_index, compute_grad)
        if compute_grad:
            torch.mm(logits, weight, out=grad_hidden[rows])
            partial = logits.t() @ h
            grad_weight = partial.float() if grad_weight is None else grad_weight.add_(partial)
    loss = row_loss.sum() * scale[0]
    if not compute_grad:
        return loss, grad_hidden, weight.new_empty(0)
    if grad_weight is None:  # no tokens
        return loss, grad_hidden, weight.new_zeros(weight.shape)
    return loss, grad_hidden, grad_weight.to(weight.dtype)


@_forward.register_fake
def _(hidden, weight, labels, ignore_index, mean, compute_grad, chunk_rows):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.set_materialize_grads(False)  # no zero-filled copies of the two gradients in the backward


def _backward(ctx, dloss, _dgrad_hidden, _dgrad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden.numel() == 0 and grad_weight.numel() == 0 and ctx.needs_input_grad[:2] != (False, False):
        raise RuntimeError("linear_cross_entropy: the forward ran without gradients (no input required "
                           "grad under grad mode), so it has no backward")
    return grad_hidden * dloss.to(grad_hidden.dtype), grad_weight * dloss.to(grad_weight.dtype), None, None, None, \
        None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, labels, reduction: str, ignore_index: int) -> None:
    check_tensor("hidden", hidden, dtypes=DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=DTYPES, ndim=2)
    check_same_dtype("weight", weight, hidden.dtype, "hidden")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[1]}) to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocab >= 1)")
    check_tensor("labels", labels, dtypes=LABEL_DTYPES, ndim=1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must have shape ({hidden.shape[0]},) to match hidden, got {tuple(labels.shape)}")
    check_same_device([("hidden", hidden), ("weight", weight), ("labels", labels)])
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ignore_index=..., reduction=...)`` without the logits.

    hidden (N, D) and weight (V, D) of one floating dtype, labels (N,) int64 or int32. ``reduction``
    is "mean" (over the tokens whose label is not ``ignore_index``) or "sum". ``chunk_rows`` tokens are
    processed at a time (default: about 2^27 logits per chunk).
    """
    _validate(hidden, weight, labels, reduction, ignore_index)
    ignore_index = check_int("ignore_index", ignore_index)
    if chunk_rows is not None:
        chunk_rows = check_int("chunk_rows", chunk_rows)
    if _backend.current_backend() == "reference" or hidden.dtype == torch.float64:
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction)
    if chunk_rows is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // weight.shape[0])
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with nvtx_range("fastllm.linear_cross_entropy"):
        return _forward(hidden, weight, labels.contiguous(), int(ignore_index), reduction == "mean", compute_grad,
                        int(chunk_rows))[0]
