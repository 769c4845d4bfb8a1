import pytest
import torch
import torch.nn.functional as F

from fastllm.ops.causal_conv1d import causal_conv1d, causal_conv1d_state, causal_conv1d_update


def reference(x, weight, bias, activation):
    """Direct sum over taps in fp64: out_t = bias + sum_k w_k x_{t - (width - 1) + k}."""
    width, length = weight.shape[1], x.shape[2]
    xp = F.pad(x.double(), (width - 1, 0))
    y = sum(weight.double()[:, k, None] * xp[..., k:k + length] for k in range(width))
    if bias is not None:
        y = y + bias.double()[:, None]
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("length,width", [(1, 4), (7, 4), (33, 2), (3, 5)])
def test_matches_direct_sum_and_decoding(length, width, activation):
    x = torch.randn(2, 6, length)
    weight, bias = torch.randn(6, width), torch.randn(6)
    y = causal_conv1d(x, weight, bias, activation)
    torch.testing.assert_close(y.double(), reference(x, weight, bias, activation), rtol=1e-5, atol=1e-5)
    # Decoding: prefill the first half, then step through the rest.
    split = length // 2
    state = causal_conv1d_state(x[..., :split], width)
    steps = [causal_conv1d_update(x[..., t], state, weight, bias, activation) for t in range(split, length)]
    if steps:
        torch.testing.assert_close(torch.stack(steps, -1), y[..., split:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, causal_conv1d_state(x, width))


def test_gradients_match_reference():
    x = torch.randn(2, 5, 19, requires_grad=True)
    weight, bias = torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    w_out = torch.randn(2, 5, 19, dtype=torch.float64)
    (causal_conv1d(x, weight, bias, "silu").double() * w_out).sum().backward()
    (reference(*leaves64, "silu") * w_out).sum().backward()
    for t, ref in zip((x, weight, bias), leaves64):
        torch.testing.assert_close(t.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x, weight = torch.randn(2, 6, 5), torch.randn(6, 4)
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(TypeError, match="floating-point"):
        causal_conv1d(x.long(), weight)
    with pytest.raises(ValueError, match="conv_state must have the shape"):
        causal_conv1d_update(x[..., 0], torch.zeros(2, 6, 3), weight)
