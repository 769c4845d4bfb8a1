"""Causal depthwise conv1d (Mamba's short convolution) in Triton, forward and backward.

x is (B, D, L) with any strides (a Mamba block's is a channel-contiguous view of its input
projection, which these kernels read in place; outputs are contiguous, as the selective scan reads
them); weight is (D, WIDTH), bias (D,) or absent:

    a_t = bias + sum_k weight[:, k] x_{t - WIDTH + 1 + k},    out_t = a_t or silu(a_t).

Forward: one program per (BLOCK_L positions, BLOCK_D channels, batch row). Arithmetic is float32
whatever the dtypes of x and the weights; outputs are in x's dtype. Backward, two passes over the
same tiles: with the activation, the first writes dA = dout * silu'(a) (float32, laid out like x);
the second reads dA (or dout itself without the activation) at the WIDTH positions each input
reaches, writes dx, and writes the tile's sums of the weight and bias terms, which the launcher adds
up (no atomics). One pass that recomputed dA at each of those WIDTH positions spent about 190
instructions per element (sm_90) and measured 1.2 ms at b8 d2048 L2048 on an H100, 18x its traffic
floor.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tiles of positions x channels, over 8 warps, one per program in every pass (compiled for sm_90 with
# Triton 3.6 and 3.9, channel-contiguous and contiguous x: no spills; see benchmarks/RESULTS.md).
# Under the interpreter (CPU tests) small tiles keep runs fast and still cross tiles.
NUM_WARPS = 8
BLOCK_L, BLOCK_D = (16, 8) if INTERPRET else (64, 64)


@triton.jit
def _load_tile(X, t, offs_d, d_valid, L, stride_xl, stride_xd):
    """x at positions t (zero outside [0, L)) and channels offs_d, float32 (BLOCK_L, BLOCK_D)."""
    mask = ((t >= 0) & (t < L))[:, None] & d_valid[None, :]
    return tl.load(X + t[:, None] * stride_xl + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weight(WEIGHT, k, offs_d, d_valid, stride_wd, stride_wk):
    return tl.load(WEIGHT + offs_d * stride_wd + k * stride_wk, mask=d_valid, other=0.0).to(tl.float32)


@triton.jit
def _preactivation(X, WEIGHT, BIAS, t, offs_d, d_valid, L, stride_xl, stride_xd, stride_wd, stride_wk,
                   WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """a at positions t: bias + sum_k weight_k x_{t - WIDTH + 1 + k}."""
    a = tl.zeros([t.shape[0], offs_d.shape[0]], tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        a += (_weight(WEIGHT, k, offs_d, d_valid, stride_wd, stride_wk)[None, :]
              * _load_tile(X, t - (WIDTH - 1) + k, offs_d, d_valid, L, stride_xl, stride_xd))
    return a


@triton.jit
def _tile_preactivation(X, WEIGHT, BIAS, L, D, stride_xb, stride_xd, stride_xl, stride_wd, stride_wk,
                        WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile (positions, channels, batch row, valid channels) and a over it."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_valid = offs_d < D
    a = _preactivation(X + b * stride_xb, WEIGHT, BIAS, offs_l, offs_d, d_valid, L, stride_xl, stride_xd,
                       stride_wd, stride_wk, WIDTH, HAS_BIAS)
    return offs_l, offs_d, b, d_valid, a


@triton.jit
def _forward_kernel(X, WEIGHT, BIAS, OUT, L, D, stride_xb, stride_xd, stride_xl, stride_ob, stride_od, stride_ol,
                    stride_wd, stride_wk, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_l, offs_d, b, d_valid, a = _tile_preactivation(X, WEIGHT, BIAS, L, D, stride_xb, stride_xd, stride_xl,
                                                        stride_wd, stride_wk, WIDTH, HAS_BIAS, BLOCK_L, BLOCK_D)
    if SILU:
        a = a * tl.sigmoid(a)
    mask = (offs_l < L)[:, None] & d_valid[None, :]
    tl.store(OUT + b * stride_ob + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
             a.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _grad_preactivation_kernel(X, WEIGHT, BIAS, DOUT, DA, L, D, stride_xb, stride_xd, stride_xl, stride_gb, stride_gd,
                               stride_gl, stride_ab, stride_ad, stride_al, stride_wd, stride_wk, WIDTH: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dA = dout * silu'(a), float32, at one tile of positions x channels."""
    offs_l, offs_d, b, d_valid, a = _tile_preactivation(X, WEIGHT, BIAS, L, D, stride_xb, stride_xd, stride_xl,
                                                        stride_wd, stride_wk, WIDTH, HAS_BIAS, BLOCK_L, BLOCK_D)
    s = tl.sigmoid(a)
    dout = _load_tile(DOUT + b * stride_gb, offs_l, offs_d, d_valid, L, stride_gl, stride_gd)
    grad = dout * s * (1.0 + a * (1.0 - s))
    tl.store(DA + b * stride_ab + offs_l[:, None] * stride_al + offs_d[None, :] * stride_ad, grad,
             mask=(offs_l < L)[:, None] & d_valid[None, :])


@triton.jit
def _input_and_weight_grad_kernel(DA, X, WEIGHT, DX, PARTIAL, L, D, stride_ab, stride_ad, stride_al, stride_xb,
                                  stride_xd, stride_xl, stride_dxb, stride_dxd, stride_dxl, stride_wd, stride_wk,
                                  WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """At one tile of positions x channels: dx_t = sum_j weight_{WIDTH - 1 - j} dA_{t + j} (x_t reaches
    a_{t + j} through tap WIDTH - 1 - j), and the tile's sums of dA_t x_{t - WIDTH + 1 + k} (tap k)
    and of dA_t, as its rows of PARTIAL."""
    pid_l = tl.program_id(0)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_valid = offs_d < D
    DA += b * stride_ab
    X += b * stride_xb
    grad = _load_tile(DA, offs_l, offs_d, d_valid, L, stride_al, stride_ad)  # zero past L
    dx = _weight(WEIGHT, WIDTH - 1, offs_d, d_valid, stride_wd, stride_wk)[None, :] * grad
    for j in tl.static_range(1, WIDTH):
        dx += (_weight(WEIGHT, WIDTH - 1 - j, offs_d, d_valid, stride_wd, stride_wk)[None, :]
               * _load_tile(DA, offs_l + j, offs_d, d_valid, L, stride_al, stride_ad))
    tl.store(DX + b * stride_dxb + offs_l[:, None] * stride_dxl + offs_d[None, :] * stride_dxd,
             dx.to(DX.dtype.element_ty), mask=(offs_l < L)[:, None] & d_valid[None, :])
    first_row = (b * tl.num_programs(0) + pid_l) * (WIDTH + 1)
    for k in tl.static_range(WIDTH):
        x = _load_tile(X, offs_l - (WIDTH - 1) + k, offs_d, d_valid, L, stride_xl, stride_xd)
        tl.store(PARTIAL + (first_row + k) * D + offs_d, tl.sum(grad * x, 0), mask=d_valid)
    tl.store(PARTIAL + (first_row + WIDTH) * D + offs_d, tl.sum(grad, 0), mask=d_valid)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers fill (the tests poison them through this)."""
    return torch.empty(shape, dtype=dtype, device=device)


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """The convolution of x (B, D, L) with weight (D, WIDTH) and bias (D,) or None; out contiguous."""
    bias = None if bias is None else bias.contiguous()  # the kernels read it with unit stride
    out = _empty(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    B, D, L = x.shape
    wrap_triton(_forward_kernel)[(triton.cdiv(L, BLOCK_L), triton.cdiv(D, BLOCK_D), B)](
        x, weight, weight if bias is None else bias, out, x.shape[2], x.shape[1], *x.stride(), *out.stride(),
        *weight.stride(), WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_L=BLOCK_L,
        BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


def conv_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx contiguous, dweight float32 (D, WIDTH), dbias float32 (D,))."""
    B, D, L = x.shape
    width = weight.shape[1]
    bias = None if bias is None else bias.contiguous()  # the kernels read it with unit stride
    dx = _empty(x.shape, x.dtype, x.device)
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(D, BLOCK_D), B)
    # Every row is written by a launch; without one (no elements) the sums over zero rows are 0.
    partial = _empty((B * grid[0], width + 1, D), torch.float32, x.device)
    if dx.numel() > 0:
        grad = dout  # dA: the gradient at the preactivation
        if silu:  # float32, laid out like x, so that both passes move it along x's contiguous axis
            channels_last = x.stride(1) == 1 and x.stride(2) != 1
            grad = (_empty((B, L, D), torch.float32, x.device).transpose(1, 2) if channels_last
                    else _empty((B, D, L), torch.float32, x.device))
            wrap_triton(_grad_preactivation_kernel)[grid](
                x, weight, weight if bias is None else bias, dout, grad, L, D, *x.stride(), *dout.stride(),
                *grad.stride(), *weight.stride(), WIDTH=width, HAS_BIAS=bias is not None, BLOCK_L=BLOCK_L,
                BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
        wrap_triton(_input_and_weight_grad_kernel)[grid](
            grad, x, weight, dx, partial, L, D, *grad.stride(), *x.stride(), *dx.stride(), *weight.stride(),
            WIDTH=width, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return dx, partial[:, :width].sum(0).t().contiguous(), partial[:, width].sum(0)
