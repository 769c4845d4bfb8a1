"""Causal depthwise conv1d (Mamba's short convolution) in Triton, forward and backward.

x is (B, D, L) with any strides (a Mamba block's is a channel-contiguous view of its input
projection, which these kernels read in place; outputs are contiguous, as the selective scan reads
them); weight is (D, WIDTH), bias (D,) or absent:

    a_t = bias + sum_k weight[:, k] x_{t - WIDTH + 1 + k},    out_t = a_t or silu(a_t).

Forward: one program per (BLOCK_L positions, BLOCK_D channels, batch row). Arithmetic is float32
whatever the dtypes of x and the weights; outputs are in x's dtype. The backward is one pass: each
program walks a chunk of positions, recomputes a at the WIDTH positions that each input reaches,
forms dA = dout * act'(a) there, writes dx, and keeps float32 sums of dweight and dbias over its
chunk, which the launcher adds up over chunks (no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tiles of positions x channels, over 8 warps. The backward holds about eleven shifted tiles at once
# (x at 2 * WIDTH - 1 shifts, dout at WIDTH). Compiled for sm_90 with Triton 3.6 and 3.9, for
# channel-contiguous x (a Mamba block's) and for contiguous x: with 4 warps the 64 x 64 forward tile
# spills (312 bytes, contiguous x, 3.9) and the 16 x 64 backward tile takes 255 registers (3.6) or
# spills (3.9); with 8 warps neither spills (forward 78-166 registers, backward 156-164). Each
# backward program walks CHUNK_L positions, so the partial weight sums take (L / CHUNK_L) rows per
# batch row. Under the interpreter (CPU tests) small tiles keep runs fast and still cross blocks and
# chunks.
NUM_WARPS = 8
if INTERPRET:
    FORWARD_BLOCK_L, BACKWARD_BLOCK_L, BACKWARD_CHUNK_L, BLOCK_D = 16, 8, 16, 8
else:
    FORWARD_BLOCK_L, BACKWARD_BLOCK_L, BACKWARD_CHUNK_L, BLOCK_D = 64, 16, 256, 64


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
def _grad_preactivation(X, WEIGHT, BIAS, DOUT, t, offs_d, d_valid, L, stride_xl, stride_xd, stride_wd, stride_wk,
                        stride_gl, stride_gd, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """dA at positions t (zero past L): dout, times silu'(a) with the activation."""
    dout = _load_tile(DOUT, t, offs_d, d_valid, L, stride_gl, stride_gd)
    if SILU:
        a = _preactivation(X, WEIGHT, BIAS, t, offs_d, d_valid, L, stride_xl, stride_xd, stride_wd, stride_wk,
                           WIDTH, HAS_BIAS)
        s = tl.sigmoid(a)
        dout = dout * s * (1.0 + a * (1.0 - s))
    return dout


@triton.jit
def _forward_kernel(X, WEIGHT, BIAS, OUT, L, D, stride_xb, stride_xd, stride_xl, stride_ob, stride_od, stride_ol,
                    stride_wd, stride_wk, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_valid = offs_d < D
    a = _preactivation(X + b * stride_xb, WEIGHT, BIAS, offs_l, offs_d, d_valid, L, stride_xl, stride_xd,
                       stride_wd, stride_wk, WIDTH, HAS_BIAS)
    if SILU:
        a = a * tl.sigmoid(a)
    mask = (offs_l < L)[:, None] & d_valid[None, :]
    tl.store(OUT + b * stride_ob + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
             a.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(X, WEIGHT, BIAS, DOUT, DX, PARTIAL, L, D, stride_xb, stride_xd, stride_xl,
                     stride_gb, stride_gd, stride_gl, stride_dxb, stride_dxd, stride_dxl, stride_wd, stride_wk,
                     WIDTH: tl.constexpr, TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     CHUNK_L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_chunk = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_valid = offs_d < D
    X += b * stride_xb
    DOUT += b * stride_gb
    DX += b * stride_dxb
    args = (X, WEIGHT, BIAS, DOUT)
    strides = (stride_xl, stride_xd, stride_wd, stride_wk, stride_gl, stride_gd)
    # This chunk's terms of dweight_k = sum_t dA_t x_{t - WIDTH + 1 + k} (tap k < WIDTH of
    # weight_terms) and of dbias = sum_t dA_t, summed over positions once, after the loop: a sum per
    # step would cost shuffles and barriers across the warps that share a channel.
    taps = tl.arange(0, TAPS)
    weight_terms = tl.zeros([TAPS, BLOCK_L, BLOCK_D], tl.float32)
    bias_terms = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    chunk_start = pid_chunk * CHUNK_L
    for start in tl.range(chunk_start, tl.minimum(chunk_start + CHUNK_L, L), BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        # x_t reaches a_{t + j} through tap WIDTH - 1 - j.
        grad_here = _grad_preactivation(*args, offs_l, offs_d, d_valid, L, *strides, WIDTH, HAS_BIAS, SILU)
        dx = _weight(WEIGHT, WIDTH - 1, offs_d, d_valid, stride_wd, stride_wk)[None, :] * grad_here
        for j in tl.static_range(1, WIDTH):
            dx += (_weight(WEIGHT, WIDTH - 1 - j, offs_d, d_valid, stride_wd, stride_wk)[None, :]
                   * _grad_preactivation(*args, offs_l + j, offs_d, d_valid, L, *strides, WIDTH, HAS_BIAS, SILU))
        mask = (offs_l < L)[:, None] & d_valid[None, :]
        tl.store(DX + offs_l[:, None] * stride_dxl + offs_d[None, :] * stride_dxd, dx.to(DX.dtype.element_ty),
                 mask=mask)
        t = offs_l[None, :, None] - (WIDTH - 1) + taps[:, None, None]
        in_range = (t >= 0) & (t < L) & (taps < WIDTH)[:, None, None] & d_valid[None, None, :]
        x = tl.load(X + t * stride_xl + offs_d[None, None, :] * stride_xd, mask=in_range, other=0.0)
        weight_terms += grad_here[None, :, :] * x.to(tl.float32)
        bias_terms += grad_here
    first_row = (b * tl.num_programs(0) + pid_chunk) * (WIDTH + 1)
    tl.store(PARTIAL + (first_row + taps[:, None]) * D + offs_d[None, :], tl.sum(weight_terms, 1),
             mask=(taps < WIDTH)[:, None] & d_valid[None, :])
    tl.store(PARTIAL + (first_row + WIDTH) * D + offs_d, tl.sum(bias_terms, 0), mask=d_valid)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers fill (the tests poison them through this)."""
    return torch.empty(shape, dtype=dtype, device=device)


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """The convolution of x (B, D, L) with weight (D, WIDTH) and bias (D,) or None; out contiguous."""
    out = _empty(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    B, D, L = x.shape
    wrap_triton(_forward_kernel)[(triton.cdiv(L, FORWARD_BLOCK_L), triton.cdiv(D, BLOCK_D), B)](
        x, weight, weight if bias is None else bias, out, x.shape[2], x.shape[1], *x.stride(), *out.stride(),
        *weight.stride(), WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_L=FORWARD_BLOCK_L,
        BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


def conv_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx contiguous, dweight float32 (D, WIDTH), dbias float32 (D,))."""
    B, D, L = x.shape
    width = weight.shape[1]
    dx = _empty(x.shape, x.dtype, x.device)
    grid = (triton.cdiv(L, BACKWARD_CHUNK_L), triton.cdiv(D, BLOCK_D), B)
    # Every row is written by a launch; without one (no elements) the sums over zero rows are 0.
    partial = _empty((B * grid[0], width + 1, D), torch.float32, x.device)
    if dx.numel() > 0:
        wrap_triton(_backward_kernel)[grid](
            x, weight, weight if bias is None else bias, dout, dx, partial, L, D, *x.stride(), *dout.stride(),
            *dx.stride(), *weight.stride(), WIDTH=width, TAPS=triton.next_power_of_2(width),
            HAS_BIAS=bias is not None, SILU=silu, CHUNK_L=BACKWARD_CHUNK_L, BLOCK_L=BACKWARD_BLOCK_L,
            BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return dx, partial[:, :width].sum(0).t().contiguous(), partial[:, width].sum(0)
