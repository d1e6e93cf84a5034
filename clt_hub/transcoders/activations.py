"""Sparse activation functions, with the straight-through estimator JumpReLU needs for training."""

from __future__ import annotations

from typing import Any

import torch


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """a = z * (z > theta). The threshold gets a pseudo-gradient from a rectangle kernel of width
    `bandwidth` (Rajamanoharan et al. 2024), since the true gradient is zero almost everywhere."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = -(theta / eps) * _rectangle((z - theta) / eps) * grad
        grad_theta = grad_theta.reshape(-1, theta.shape[-1]).sum(0) if theta.dim() == 1 else grad_theta
        return grad_z, grad_theta, None


class _StepFn(torch.autograd.Function):
    """H(z - theta) with the same straight-through gradient for theta; used for the L0 penalty."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((z - theta) / eps) * grad
        grad_theta = grad_theta.reshape(-1, theta.shape[-1]).sum(0) if theta.dim() == 1 else grad_theta
        return torch.zeros_like(z), grad_theta, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float = 2.0) -> torch.Tensor:
    if torch.is_grad_enabled() and (z.requires_grad or theta.requires_grad):
        return _JumpReLUFn.apply(z, theta, bandwidth)  # type: ignore[no-any-return]
    return z * (z > theta).to(z.dtype)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float = 2.0) -> torch.Tensor:
    if torch.is_grad_enabled() and theta.requires_grad:
        return _StepFn.apply(z, theta, bandwidth)  # type: ignore[no-any-return]
    return (z > theta).to(z.dtype)


def topk_relu(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations per row (after ReLU); gradients flow to the kept ones."""
    values, indices = torch.topk(z, k, dim=-1)
    return torch.zeros_like(z).scatter(-1, indices, torch.relu(values))


def activate(z: torch.Tensor, activation: str, theta: torch.Tensor | None = None, k: int | None = None,
             bandwidth: float = 2.0) -> torch.Tensor:
    """The transcoder's activation by name: 'relu', 'jumprelu' (needs `theta`) or 'topk' (needs `k`)."""
    if activation == "jumprelu":
        assert theta is not None
        return jumprelu(z, theta, bandwidth)
    if activation == "relu":
        return torch.relu(z)
    assert k is not None
    return topk_relu(z, k)
