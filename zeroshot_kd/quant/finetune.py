"""Distillation fine-tuning of a fake-quantized student: weights, biases and step sizes (LSQ) against the teacher.

The student runs in **eval mode** throughout: with folded BN there are no running statistics to drift, and if
folding is disabled BN keeps its running statistics (required when fine-tuning on synthetic or Gaussian data).
Zero points stay fixed integers; step sizes are clamped to >= 1e-8 after each step.

The loss is pluggable (``loss_fn(student_logits, teacher_logits, inputs, targets) -> (loss, terms)``); the default
is Hinton's temperature-softened KL, ``T^2 * KL(p_t^T || p_s^T)`` with ``batchmean`` reduction and ``T = 4``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import ZkdError
from ..runtime import autocast
from .modules import quant_layers

__all__ = ["DEFAULT_TEMPERATURE", "LossFn", "finetune", "kd_loss"]

DEFAULT_TEMPERATURE = 4.0
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def kd_loss(temperature: float = DEFAULT_TEMPERATURE) -> LossFn:
    """The default objective: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, batchmean, in float32."""

    def loss_fn(s: torch.Tensor, t: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        T = temperature
        kl = F.kl_div(F.log_softmax(s.float() / T, 1), F.log_softmax(t.float() / T, 1), reduction="batchmean",
                      log_target=True) * (T * T)
        return kl, {"kd": kl.item()}

    return loss_fn


def _param_groups(student: nn.Module, lr: float, scale_lr: float) -> tuple[list[dict], list[nn.Parameter]]:
    scales: list[nn.Parameter] = []
    for _, layer in quant_layers(student):
        scales.append(layer.wq.scale)
        if layer.aq is not None:
            scales.append(layer.aq.scale)
    scale_ids = {id(p) for p in scales}
    others = [p for p in student.parameters() if id(p) not in scale_ids]
    return [{"params": others, "lr": lr}, {"params": scales, "lr": scale_lr}], others + scales


def finetune(student: nn.Module, teacher: nn.Module, loader: Callable[[int], Iterable] | Iterable, steps: int,
             lr: float = 1e-5, scale_lr: float | None = None, device: torch.device | str = "cpu",
             precision: str = "fp32", loss_fn: LossFn | None = None, temperature: float = DEFAULT_TEMPERATURE,
             progress: bool = True, log_every: int = 50) -> list[dict[str, float]]:
    """Fine-tune ``student`` towards ``teacher`` for ``steps`` optimizer steps, in place.

    Args:
        student: the calibrated fake-quantized student; kept in eval mode.
        teacher: the frozen float teacher.
        loader: an iterable of ``(inputs, targets)`` batches (a DataLoader), re-iterated when exhausted, or a
            callable ``loader(epoch)`` returning that pass's batches (so the order depends only on seed and epoch).
        steps: number of optimizer steps.
        lr: Adam learning rate of weights and biases (cosine decay to 0).
        scale_lr: learning rate of the step sizes (default: ``lr``).
        device, precision: where and how to run forward passes; the loss is float32.
        loss_fn: ``(student_logits, teacher_logits, inputs, targets) -> (loss, terms)``; default :func:`kd_loss`.
        temperature: T of the default loss.
        progress: tqdm bar over steps.
        log_every: record the mean loss terms every this many steps.

    Returns:
        History rows ``{"step": ..., **mean terms}``.
    """
    device = torch.device(device)
    loss_fn = loss_fn or kd_loss(temperature)
    student.eval()
    teacher.eval()
    groups, params = _param_groups(student, lr, scale_lr if scale_lr is not None else lr)
    saved_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=0.0)
    history: list[dict[str, float]] = []
    acc: dict[str, float] = {}
    count = 0

    def batches() -> Iterable:
        for epoch in itertools.count():
            empty = True
            for b in (loader(epoch) if callable(loader) else loader):
                empty = False
                yield b
            if empty:
                return

    try:
        it = iter(batches())
        for step in tqdm(range(steps), desc="fine-tune", disable=not progress, leave=False):
            x, y = next(it)
            x, y = x.to(device), y.to(device)
            with torch.no_grad(), autocast(device, precision):
                t_logits = teacher(x)
            with autocast(device, precision):
                s_logits = student(x)
            loss, terms = loss_fn(s_logits.float(), t_logits.float(), x, y)
            if not math.isfinite(loss.item()):
                raise ZkdError(f"fine-tuning loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for _, layer in quant_layers(student):
                layer.wq.clamp_scale_()
                if layer.aq is not None:
                    layer.aq.clamp_scale_()
            for k, v in {"loss": loss.item(), **terms}.items():
                acc[k] = acc.get(k, 0.0) + float(v)
            count += 1
            if count == log_every or step == steps - 1:
                history.append({"step": step + 1, **{k: v / count for k, v in acc.items()}})
                acc, count = {}, 0
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        student.eval()
    return history
