"""BatchNorm statistics of every BN layer's input during a forward pass, and the divergences built on them.

Conventions (used by synthesis, similarity and calibration alike):

* Statistics are taken on the **input** of each BatchNorm layer, per channel, pooled over the batch and spatial
  positions, in float32 even under autocast. :class:`BNStatsHook` computes them inside a frozen teacher's BN layer
  (fused with its output and backward) or, for any other BN layer, from its input captured by
  :class:`zeroshot_kd.capture.Capture` (a forward pre-hook).
* The batch variance is the **biased** one (divide by N*H*W), as BatchNorm normalizes with it in training
  mode. The stored ``running_var`` was accumulated from the *unbiased* estimator; at N*H*W in the thousands
  the difference (a factor N/(N-1)) is negligible, and we compare the two as they are, as DeepInversion does.
* Variances get the layer's ``eps`` added before any log or division (``var + eps`` is what BN divides by).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .capture import Capture
from .errors import ZkdError

__all__ = [
    "BNStat",
    "BNStats",
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


@dataclass
class BNStats:
    """The statistics of every recorded BN layer, concatenated over layers in execution order.

    One vector per quantity, so that a loss over all layers is a handful of operations (a few kernel launches on
    a GPU) instead of a dozen per layer: ResNet-50 has 53 BN layers. Iterating gives one :class:`BNStat` per
    layer (views into the vectors).
    """

    names: list[str]
    sizes: list[int]  # channels per layer
    mean: torch.Tensor  # (sum C,)
    var: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: torch.Tensor  # each layer's eps, repeated over its channels

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[BNStat]:
        parts = [t.split(self.sizes) for t in (self.mean, self.var, self.running_mean, self.running_var, self.eps)]
        for name, m, v, rm, rv, e in zip(self.names, *parts):
            yield BNStat(name, m, v, rm, rv, float(e[0]))

    @classmethod
    def stack(cls, layers: "BNStats | Sequence[BNStat]") -> "BNStats":
        """Concatenate per-layer statistics (returned unchanged if already stacked; at least one layer)."""
        if isinstance(layers, BNStats):
            return layers
        cat = lambda key: torch.cat([getattr(s, key) for s in layers])  # noqa: E731
        eps = torch.cat([torch.full_like(s.running_var, s.eps) for s in layers])
        return cls([s.name for s in layers], [s.mean.numel() for s in layers], cat("mean"), cat("var"),
                   cat("running_mean"), cat("running_var"), eps)


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, *spatial), in float32 at least. No autograd here.

    On CUDA one Welford reduction (``var_mean``). On CPU, where that kernel is several times slower than plain
    sums, E[x^2] - E[x]^2 from sums taken along contiguous memory (the squares as a squared ``vector_norm``, never
    materialized); it loses precision only when |mean| >> std, which BN inputs of a trained network do not show
    (tested against float64).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.device.type != "cpu" or not x.is_contiguous():
        var, mean = torch.var_mean(x.to(dtype), dim=_channel_dims(x), correction=0)
        return mean, var
    n = x.numel() // x.shape[1]
    rows = x.reshape(x.shape[0], x.shape[1], -1)
    mean = rows.sum(-1, dtype=dtype).sum(0) / n
    sq = torch.linalg.vector_norm(rows, dim=-1, dtype=dtype).square().sum(0) / n
    return mean, (sq - mean * mean).clamp_min(0)


# F.batch_norm refuses eps <= 0 in some torch releases (2.11 does, even in eval). With this eps and a variance of
# 1 - eps, both exact in float32, var + eps is exactly 1 and the kernel's 1/sqrt(var + eps) exactly 1.
_UNIT_EPS = 2.0**-20


@functools.lru_cache(maxsize=256)
def _unit_var(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((channels,), 1.0 - _UNIT_EPS, dtype=dtype, device=device)


def _moments_input_grad(x: torch.Tensor, mean: torch.Tensor, g_mean: torch.Tensor, g_var: torch.Tensor) -> torch.Tensor:
    """d(mean, var)/dx applied to (g_mean, g_var): ``(x - mean) * 2 g_var / n + g_mean / n``, per channel.

    One pass through the eval-mode BatchNorm kernel (centred on ``mean``, variance + eps = 1): about twice as fast
    on CPU as elementwise ops with broadcast per-channel operands, and one kernel on a GPU.
    """
    n = x.numel() // x.shape[1]
    slope, shift = g_var * (2.0 / n), g_mean / n
    return F.batch_norm(x, mean, _unit_var(mean.numel(), mean.dtype, mean.device), slope, shift, False, 0.0,
                        _UNIT_EPS)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel (mean, biased variance) of x with a one-pass backward. Used by the captured-input path; frozen
    eval-mode layers take :class:`_EvalBatchNormWithMoments` instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        mean, var = _mean_var(x)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        x, mean = ctx.saved_tensors
        return _moments_input_grad(x, mean, g_mean, g_var).to(x.dtype)


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in float32 at least (float64 stays float64)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _eval_bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """d(output)/d(input) of an eval-mode BN, per channel: weight / sqrt(running_var + eps)."""
    scale = torch.rsqrt(_widened(bn.running_var) + bn.eps)
    return scale * _widened(bn.weight) if bn.weight is not None else scale


class _EvalBatchNormWithMoments(torch.autograd.Function):
    """A frozen eval-mode BatchNorm that also returns the per-channel mean and variance of its input.

    Output ``y`` is exactly ``F.batch_norm(x, running_mean, running_var, weight, bias, eps)``. Eval BN is a
    per-channel affine map, so with the statistics' gradients the input gradient is one expression,
    ``gy * scale + (x - mean) * 2 g_var / n + g_mean / n``, computed in two passes where BN's backward, the
    statistics' backward and autograd's accumulation of the two would take three plus an extra buffer; the
    statistics cost one reduction in forward. This is what brings a BN-matching iteration close to the bare
    forward+backward (``make bench``). No gradient for the BN's own parameters: it is used only when they are
    frozen. ``scale`` is :func:`_eval_bn_scale`, computed once per context.
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, scale):  # noqa: ANN001
        y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        mean, var = _mean_var(x)
        ctx.save_for_backward(x, mean, scale)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, g_mean, g_var):  # noqa: ANN001
        x, mean, scale = ctx.saved_tensors
        gx = _moments_input_grad(x, mean, g_mean, g_var)
        gx = gx.addcmul_(gy, scale.view([1, -1] + [1] * (x.dim() - 2)).to(gx.dtype))
        return gx, None, None, None, None, None, None


def _can_fuse(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Fuse only a stock, frozen, eval-mode layer: anything else keeps its own forward and gets a plain hook."""
    return (
        type(bn).forward is nn.modules.batchnorm._BatchNorm.forward
        and "forward" not in vars(bn)
        and not bn.training
        and not any(p.requires_grad for p in bn.parameters(recurse=False))
    )


class BNStatsHook:
    """Context manager that records the input statistics of every BatchNorm layer on each forward pass.

    Example::

        with BNStatsHook(teacher) as hook:
            logits = teacher(x)
            loss = bns_kl_loss(hook.stats)

    The statistics keep their autograd graph, so losses on them back-propagate into ``x``. A stock BatchNorm
    layer that is frozen and in eval mode (a teacher's) has its ``forward`` replaced, for the duration of the
    context only, by :class:`_EvalBatchNormWithMoments`: same output, statistics computed in the same call and
    one fused backward. Any other layer's input is captured (:class:`~zeroshot_kd.capture.Capture`, a reduction
    on the live tensor, with its graph). Everything is restored on exit
    (DeepInversion's hooks never were; NVlabs/DeepInversion PR #35); the model's parameters and buffers are not
    touched, and its running statistics are read once per context.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = bn_layers(model)
        self._capture: Capture | None = None
        self._patched: list[nn.Module] = []
        self._records: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, mean, var)
        self._stacked: BNStats | None = None
        self._constants: dict[tuple, tuple] = {}

    def __enter__(self) -> "BNStatsHook":
        hooked: dict[str, int] = {}
        for i, (name, bn) in enumerate(self.layers):
            if _can_fuse(bn):
                bn.forward = self._fused_forward(i, bn)
                self._patched.append(bn)
            else:
                hooked[f"{name}@in"] = i
        if hooked:
            self._capture = Capture(self.model, list(hooked),
                                    reduce=lambda addr, x: self._record(hooked[addr], *_ChannelMoments.apply(x)))
            self._capture.open()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None
        for bn in self._patched:
            del bn.forward  # back to the class's forward
        self._patched.clear()
        self._constants.clear()

    def clear(self) -> None:
        """Forget the recorded statistics (call before each forward pass)."""
        self._records = []
        self._stacked = None

    @property
    def stats(self) -> BNStats:
        """Statistics of the layers run since the last :meth:`clear`, in execution order."""
        if self._stacked is None:
            self._stacked = self._stack()
        return self._stacked

    def _record(self, i: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        self._records.append((i, mean, var))
        self._stacked = None

    def _stack(self) -> BNStats:
        if not self._records:
            empty = torch.zeros(0)
            return BNStats([], [], empty, empty, empty, empty, empty)
        key = tuple(i for i, _, _ in self._records)
        if key not in self._constants:
            # Per context and layer sequence: names, sizes and running statistics as vectors.
            device = self._records[0][1].device
            bns = [self.layers[i][1] for i in key]
            self._constants[key] = (
                [self.layers[i][0] for i in key], [bn.num_features for bn in bns],
                torch.cat([_widened(bn.running_mean) for bn in bns]).to(device),
                torch.cat([_widened(bn.running_var) for bn in bns]).to(device),
                torch.cat([torch.full((bn.num_features,), float(bn.eps)) for bn in bns]).to(device),
            )
        names, sizes, running_mean, running_var, eps = self._constants[key]
        mean = torch.cat([m for _, m, _ in self._records])
        var = torch.cat([v for _, _, v in self._records])
        return BNStats(names, sizes, mean, var, running_mean, running_var, eps)

    def _fused_forward(self, i: int, bn: nn.modules.batchnorm._BatchNorm):
        scale = _eval_bn_scale(bn)  # constant for the context: the layer is frozen

        def forward(x: torch.Tensor) -> torch.Tensor:
            bn._check_input_dim(x)
            y, mean, var = _EvalBatchNormWithMoments.apply(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                           bn.eps, scale)
            self._record(i, mean, var)
            return y

        return forward


def gaussian_kl(mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_p, var_p) || N(mu_q, var_q)) in nats.

    ``0.5 * log(var_q / var_p) + (var_p + (mu_p - mu_q)^2) / (2 var_q) - 0.5``; zero iff the Gaussians match.
    """
    return 0.5 * torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / (2 * var_q) - 0.5


def _stacked(stats: BNStats | Sequence[BNStat]) -> BNStats:
    if not len(stats):
        raise ZkdError("no BatchNorm statistics were recorded; the teacher has no BatchNorm layers")
    return BNStats.stack(stats)


def bns_kl_loss(stats: BNStats | Sequence[BNStat], first_bn_multiplier: float = 1.0) -> torch.Tensor:
    """BNS loss of The Knowledge Within (Haroush et al. 2020): KL(N(mu_run, var_run) || N(mu_batch, var_batch)).

    Per channel, with the running statistics as the reference; summed over channels, averaged over layers. The
    first layer's term can be up-weighted (DeepInversion's ``first_bn_multiplier``; 1 = the paper).
    """
    s = _stacked(stats)
    kl = gaussian_kl(s.running_mean, s.running_var + s.eps, s.mean, s.var + s.eps)
    total = kl.sum()
    if first_bn_multiplier != 1.0:
        total = total + (first_bn_multiplier - 1.0) * kl[: s.sizes[0]].sum()
    return total / len(s)


@functools.lru_cache(maxsize=32)
def _segment_index(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    cols = torch.cat([torch.arange(c) for c in sizes])
    return rows.to(device), cols.to(device)


def _segment_norms(v: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The L2 norm of each layer's segment of ``v``: rows of a zero-padded (layers, max C) matrix.

    One ``vector_norm`` instead of one per layer, with its backward, which is 0 (not NaN) at a zero gap.
    """
    rows, cols = _segment_index(tuple(sizes), v.device)
    padded = v.new_zeros(len(sizes), max(sizes)).index_put((rows, cols), v)
    return torch.linalg.vector_norm(padded, dim=1)


def deepinversion_feature_loss(stats: BNStats | Sequence[BNStat], first_bn_multiplier: float = 10.0) -> torch.Tensor:
    """DeepInversion's R_feature: sum_l s_l (||mu_batch - mu_run||_2 + ||var_batch - var_run||_2).

    Plain (not squared) L2 norms of the mean and *variance* differences, summed over layers, with
    s_0 = ``first_bn_multiplier`` (10 in the authors' code since 2020-06) and s_l = 1 otherwise.
    """
    s = _stacked(stats)
    per_layer = _segment_norms(s.mean - s.running_mean, s.sizes) + _segment_norms(s.var - s.running_var, s.sizes)
    total = per_layer.sum()
    if first_bn_multiplier != 1.0:
        total = total + (first_bn_multiplier - 1.0) * per_layer[0]
    return total
