"""Normalization and attention (computed in fp32, rounded at the op boundary)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anemlld.runtime.portable.registry import Kernel, Tensor, OpView, axis_index, as_f32, builds


@builds("softmax")
def _softmax(b: OpView) -> Kernel:
    axis, out = b.int("axis", -1), b.out_dtype()
    return (lambda x: torch.softmax(as_f32(x), dim=axis).to(out)), ("x",)


@builds("layer_norm")
def _layer_norm(b: OpView) -> Kernel:
    axes = b.ints("axes", None)
    eps, out = b.float("epsilon", 1e-5), b.out_dtype()
    args = ("x",) + tuple(k for k in ("gamma", "beta") if b.has(k))
    has_gamma, has_beta = b.has("gamma"), b.has("beta")
    rank = len(b.var("x").shape)
    dims = list(range(rank)) if axes is None else [axis_index(a, rank) for a in axes]
    trailing = sorted(dims) == list(range(rank - len(dims), rank))
    order = sorted(range(len(dims)), key=lambda i: dims[i])

    def affine(p: Tensor, x: Tensor) -> Tensor:
        # gamma has shape x.shape[axes] in the order `axes` lists them.
        p = as_f32(p).permute(order) if len(order) > 1 else as_f32(p)
        shape = [1] * x.dim()
        for d, size in zip(sorted(dims), p.shape):
            shape[d] = size
        return p.reshape(shape)

    def run(x: Tensor, *params: Tensor) -> Tensor:
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        xf = as_f32(x)
        if trailing and order == sorted(order):
            shape = x.shape[rank - len(dims):]
            y = F.layer_norm(xf, shape, None if gamma is None else as_f32(gamma).reshape(shape),
                             None if beta is None else as_f32(beta).reshape(shape), eps)
            return y.to(out)
        mean = xf.mean(dim=dims, keepdim=True)
        var = xf.var(dim=dims, keepdim=True, unbiased=False)
        y = (xf - mean) * torch.rsqrt(var + eps)
        if gamma is not None:
            y = y * affine(gamma, x)
        if beta is not None:
            y = y + affine(beta, x)
        return y.to(out)
    return run, args


@builds("batch_norm")
def _batch_norm(b: OpView) -> Kernel:
    eps, out = b.float("epsilon", 1e-5), b.out_dtype()
    has_gamma, has_beta = b.has("gamma"), b.has("beta")
    args = ("x", "mean", "variance") + tuple(k for k in ("gamma", "beta") if b.has(k))

    def run(x: Tensor, mean: Tensor, var: Tensor, *params: Tensor) -> Tensor:
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        return F.batch_norm(as_f32(x), as_f32(mean.reshape(-1)), as_f32(var.reshape(-1)),
                            None if gamma is None else as_f32(gamma.reshape(-1)),
                            None if beta is None else as_f32(beta.reshape(-1)), False, 0.0, eps).to(out)
    return run, args


@builds("instance_norm")
def _instance_norm(b: OpView) -> Kernel:
    eps, out = b.float("epsilon", 1e-5), b.out_dtype()
    has_gamma, has_beta = b.has("gamma"), b.has("beta")
    args = ("x",) + tuple(k for k in ("gamma", "beta") if b.has(k))

    def run(x: Tensor, *params: Tensor) -> Tensor:
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        return F.instance_norm(as_f32(x), weight=None if gamma is None else as_f32(gamma),
                               bias=None if beta is None else as_f32(beta), eps=eps).to(out)
    return run, args


@builds("l2_norm")
def _l2_norm(b: OpView) -> Kernel:
    eps, out = b.float("epsilon", 1e-6), b.out_dtype()

    def run(x: Tensor) -> Tensor:
        xf = as_f32(x)
        dims = tuple(range(max(0, x.dim() - 3), x.dim()))
        return (xf / torch.sqrt(torch.sum(xf * xf, dim=dims, keepdim=True) + eps)).to(out)
    return run, ("x",)


@builds("scaled_dot_product_attention")
def _sdpa(b: OpView) -> Kernel:
    out = b.out_dtype()

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        qf, kf, vf = as_f32(q), as_f32(k), as_f32(v)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + as_f32(mask)
        return torch.matmul(torch.softmax(scores, dim=-1), vf).to(out)
    return run, ("query", "key", "value", "attn_mask") if b.has("attn_mask") else ("query", "key", "value")
