"""BatchNorm statistics: forward hooks on every BN layer's input, and the divergences built on them.

Conventions (used by synthesis, similarity and calibration alike):

* Statistics are taken on the **input** of each BatchNorm layer (``input[0]`` of a forward hook), per channel,
  pooled over the batch and spatial positions, in float32 even under autocast.
* The batch variance is the **biased** one (divide by N*H*W), as BatchNorm normalizes with it in training
  mode. The stored ``running_var`` was accumulated from the *unbiased* estimator; at N*H*W in the thousands
  the difference (a factor N/(N-1)) is negligible, and we compare the two as they are, as DeepInversion does.
* Variances get the layer's ``eps`` added before any log or division (``var + eps`` is what BN divides by).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import ZkdError

__all__ = [
    "BNStat",
    "BNStatsHook",
    "bn_layers",
    "bns_kl_loss",
    "deepinversion_feature_loss",
    "gaussian_kl",
    "require_bn",
]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """All BatchNorm layers that carry running statistics, in module order, with their paths."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def require_bn(model: nn.Module, what: str) -> None:
    """Raise a one-line error when a BN-based method is asked of a model without BatchNorm layers."""
    if not bn_layers(model):
        raise ZkdError(f"{what} needs a teacher with BatchNorm layers (running statistics); this teacher has none "
                       "-- use --method inception or gaussian")


@dataclass
class BNStat:
    """Statistics of one BN layer's input for the current batch, next to the layer's running statistics."""

    name: str
    mean: torch.Tensor  # (C,) float32, batch+spatial mean
    var: torch.Tensor  # (C,) float32, biased batch+spatial variance
    running_mean: torch.Tensor  # (C,) float32
    running_var: torch.Tensor  # (C,) float32
    eps: float
    sample_mean: torch.Tensor | None = None  # (N, C) per-sample spatial means, when asked for


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


class _ChannelMoments(torch.autograd.Function):
    """Per-channel sums of x and x^2, with a one-pass backward ``g1 + 2 x g2`` (a single ``addcmul``).

    Autograd on ``x.sum()`` and ``(x * x).sum()`` would run three full passes over the activation in backward; this
    is the cost that dominates the BN terms on small networks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        dims = _channel_dims(x)
        ctx.save_for_backward(x)
        return x.sum(dim=dims), (x * x).sum(dim=dims)

    @staticmethod
    def backward(ctx, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.addcmul(g1.view(shape), x, (2 * g2).view(shape))


class BNStatsHook:
    """Context manager that records the input statistics of every BatchNorm layer on each forward pass.

    Example::

        with BNStatsHook(teacher) as hook:
            logits = teacher(x)
            loss = bns_kl_loss(hook.stats)

    The statistics keep their autograd graph, so losses on them back-propagate into ``x``. Hooks are removed
    on exit (DeepInversion's hooks never were; NVlabs/DeepInversion PR #35).

    Args:
        model: the network; it is not modified.
        per_sample: also keep per-sample spatial means (used for per-image scores).
    """

    def __init__(self, model: nn.Module, per_sample: bool = False) -> None:
        self.layers = bn_layers(model)
        self.per_sample = per_sample
        self.stats: list[BNStat] = []
        self._handles: list = []

    def __enter__(self) -> "BNStatsHook":
        for name, bn in self.layers:
            self._handles.append(bn.register_forward_hook(self._make_hook(name, bn)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.stats = []

    def _make_hook(self, name: str, bn: nn.modules.batchnorm._BatchNorm):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].float()
            dims = _channel_dims(x)
            running_mean = bn.running_mean.float()
            # Plain sums of x and x^2: one elementwise pass plus two reductions, several times faster than
            # var_mean's Welford kernel on CPU (forward and backward). E[x^2] - E[x]^2 loses precision only when
            # |mean| >> std, which BN inputs of a trained network do not show (tested against float64).
            n = x.numel() // x.shape[1]
            s1, s2 = _ChannelMoments.apply(x)
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0)
            sample_mean = x.mean(dim=dims[1:]) if (self.per_sample and x.dim() > 2) else None
            self.stats.append(BNStat(name, mean, var, running_mean, bn.running_var.float(), float(bn.eps),
                                     sample_mean))

        return hook

    def __iter__(self) -> Iterator[BNStat]:
        return iter(self.stats)


def gaussian_kl(mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_p, var_p) || N(mu_q, var_q)) in nats.

    ``0.5 * log(var_q / var_p) + (var_p + (mu_p - mu_q)^2) / (2 var_q) - 0.5``; zero iff the Gaussians match.
    """
    return 0.5 * torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / (2 * var_q) - 0.5


def bns_kl_loss(stats: list[BNStat], first_bn_multiplier: float = 1.0) -> torch.Tensor:
    """BNS loss of The Knowledge Within (Haroush et al. 2020): KL(N(mu_run, var_run) || N(mu_batch, var_batch)).

    Per channel, with the running statistics as the reference; summed over channels, averaged over layers. The
    first layer's term can be up-weighted (DeepInversion's ``first_bn_multiplier``; 1 = the paper).
    """
    if not stats:
        raise ZkdError("no BatchNorm statistics were recorded; the teacher has no BatchNorm layers")
    terms = []
    for i, s in enumerate(stats):
        kl = gaussian_kl(s.running_mean, s.running_var + s.eps, s.mean, s.var + s.eps).sum()
        terms.append(kl * (first_bn_multiplier if i == 0 else 1.0))
    return torch.stack(terms).mean()


def deepinversion_feature_loss(stats: list[BNStat], first_bn_multiplier: float = 10.0) -> torch.Tensor:
    """DeepInversion's R_feature: sum_l s_l (||mu_batch - mu_run||_2 + ||var_batch - var_run||_2).

    Plain (not squared) L2 norms of the mean and *variance* differences, summed over layers, with
    s_0 = ``first_bn_multiplier`` (10 in the authors' code since 2020-06) and s_l = 1 otherwise.
    """
    if not stats:
        raise ZkdError("no BatchNorm statistics were recorded; the teacher has no BatchNorm layers")
    total = stats[0].mean.new_zeros(())
    for i, s in enumerate(stats):
        r = torch.linalg.vector_norm(s.mean - s.running_mean) + torch.linalg.vector_norm(s.var - s.running_var)
        total = total + (first_bn_multiplier if i == 0 else 1.0) * r
    return total
