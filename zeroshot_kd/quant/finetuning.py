"""KD fine-tuning of a fake-quantized student (weights, biases and LSQ step sizes) through the one training loop.

This module is the quantization *recipe*; the loop is :func:`zeroshot_kd.training.train_student`. The recipe:

* the student runs in **eval mode** throughout (``freeze_bn``): with folded BN there are no running statistics to
  drift, and if folding is disabled BN keeps its running statistics (required on synthetic or Gaussian data);
* Adam (no weight decay, lr 3e-4 by default: the measured recipe with 4000 steps, see below) with a cosine decay
  to 0 over ``steps``; the activation step sizes are a param group with their own lr (``scale_lr``, default
  ``lr``) and are clamped to >= 1e-8 after each step; zero points stay fixed integers;
* the **weight step sizes stay fixed** (set by the range search or learned by GENIE-M reconstruction). Why: Adam
  moves every parameter by about ``lr`` per step whatever its size, and per-channel weight steps of small channels
  are 1e-3 or less, so learning them moves those channels' grids by a large fraction. Measured after the default
  reconstruction, 1024 real images, 500 steps at lr 1e-5, top-1 on 10000 test images: fmnist_resnet14 W3A3 92.27
  -> 90.08 with learned weight steps, -> 92.49 with fixed ones (one run each, all 1024 images fitting; stop 21's
  closing note). LSQ learns them with SGD, whose gradient scaling keeps the update relative; the weights
  themselves still learn here;
* the objectives' own parameters (OFD/FSP connectors) are in the same optimizer at ``objective_lr``;
* each pass over the calibration images is an epoch (a fresh order from ``batch_generator(seed, epoch,
  "finetune")``, incomplete batches dropped), so epoch schedules (IFM's critical period) advance;
* the default objective is Hinton's ``T^2 * KL(p_t^T || p_s^T)``, batchmean, ``T = 4`` (``kd:T=4``);
* every batch is **mixed with itself** (``mixup``, on by default; :mod:`zeroshot_kd.augment`) and the teacher
  answers on the mixed images. Why: the calibration set is small (768 fitting images by default) and fine-tuning
  passes over it a hundred times; on synthetic images the student then learns their artifacts and loses real
  accuracy while its KL on held-out synthetic images still falls. Measured (``bench/results/targets.md``),
  fmnist_mobilenetv2, 1024 DeepInversion images, 4000 steps at lr 3e-4: W3A3 85.94 before fine-tuning -> 84.18
  without mixup, 86.86 with it (87.77 / 87.52 at seeds 1 / 2); W4A4 88.77 -> 88.77 (rejected by the check) without,
  90.22 with it.
* optionally **QDrop** (``drop_prob`` < 1, off by default): at every step each activation element is quantized
  with probability ``drop_prob``, else kept in full precision (Wei et al., 2022, used here beyond reconstruction);
  the masks come from a generator reseeded per step from ``(seed, step)``. Why: like mixup it keeps the student
  from fitting the synthetic images (the flatter solution QDrop argues for). Measured
  (``bench/results/targets-qdrop.md``), fmnist_mobilenetv2, 1024 DeepInversion images, 4000 steps, seeds 0 / 1 / 2:
  W3A3 86.86 / 87.77 / 87.52 -> 87.19 / 88.10 / 87.79, W4A4 90.22 / 90.09 / 90.22 -> 90.26 / 90.25 / 90.35. Off by
  default because on real images it costs (W4A4 90.55 -> 90.14, W3A3 89.03 -> 88.64) and with the asymmetric
  weight grid it costs too (W4A4 mean 90.36 -> 90.07 over three seeds).
* optionally **shift and flip** (``shift`` pixels, ``flip``; off by default; :func:`zeroshot_kd.augment
  .shift_flip_batch`) before mixup, the teacher answering on the moved images. Measured
  (``bench/results/targets-aug.md``), fmnist_mobilenetv2, 1024 DeepInversion images, 4000 steps, seeds 0 / 1 / 2:
  with ``--w-asym`` W4A4 90.42 / 90.56 / 90.30 with both (mean 90.43 against 90.36), 90.21 with flip alone, 90.31
  with shift alone; W3A3 with ``drop_prob`` 0.5 mean 87.69 -> 87.82; all within the seed spread. They cost on real
  images (W4A4 90.55 -> 90.24) and with every layer at 4 bits (89.31 -> 88.76), so they stay off.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ZkdError
from ..objectives import REGISTRY, ObjectiveSet, build
from ..training import TrainConfig, shuffled_batches, train_student
from ..runtime import batch_generator, batch_seed, device_generator
from .modules import quant_layers

__all__ = ["CONNECTOR_LR", "DEFAULT_TEMPERATURE", "clamp_step_sizes", "finetune", "finetune_objectives",
           "step_size_groups"]

DEFAULT_TEMPERATURE = 4.0
CONNECTOR_LR = 1e-3  # the objectives' connectors start from scratch: they need a far larger lr than the weights


def finetune_objectives(objectives: Sequence[str] | ObjectiveSet | None,
                        temperature: float = DEFAULT_TEMPERATURE) -> ObjectiveSet:
    """The fine-tuning objectives: ``kd:T=temperature`` by default; objectives needing distill's recipe refused.

    Raises:
        ZkdError: an unknown objective or parameter, or cskd/kdcl (pair sampler, peer networks).
    """
    objset = objectives if isinstance(objectives, ObjectiveSet) else build(
        list(objectives) if objectives else [f"kd:T={temperature}"])
    loop_only = [o.name for o in objset.items if o.needs_loop]
    if loop_only:
        names = ", ".join(n for n, cls in REGISTRY.items() if not cls.needs_loop)
        raise ZkdError(f"objective(s) {', '.join(loop_only)} need the zkd distill recipe (pair sampler or peer "
                       f"networks); in calibrate use: {names}")
    return objset


def step_size_groups(student: nn.Module, lr: float, scale_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: weights and biases at ``lr``, the activation step sizes (LSQ) at ``scale_lr`` (default
    ``lr``); the weight step sizes are in no group, so they stay fixed (module docstring)."""
    act_scales = [layer.aq.scale for _, layer in quant_layers(student) if layer.aq is not None]
    fixed = {id(layer.wq.scale) for _, layer in quant_layers(student)} | {id(p) for p in act_scales}
    others = [p for p in student.parameters() if id(p) not in fixed]
    return [{"params": others, "lr": lr}, {"params": act_scales, "lr": scale_lr if scale_lr is not None else lr}]


def clamp_step_sizes(student: nn.Module) -> None:
    """Keep every step size >= 1e-8 (after an optimizer step)."""
    for _, layer in quant_layers(student):
        layer.wq.clamp_scale_()
        if layer.aq is not None:
            layer.aq.clamp_scale_()


def finetune(student: nn.Module, teacher: nn.Module, data: Dataset, steps: int,
             objectives: Sequence[str] | ObjectiveSet | None = None, *, lr: float = 3e-4,
             scale_lr: float | None = None, objective_lr: float = CONNECTOR_LR, batch_size: int = 32, seed: int = 0,
             device: torch.device | str = "cpu", precision: str = "fp32", temperature: float = DEFAULT_TEMPERATURE,
             spec: Any = None, mixup: bool = True, shift: int = 0, flip: bool = False, drop_prob: float = 1.0,
             progress: bool = True, log_every: int = 50) -> list[dict[str, Any]]:
    """Fine-tune ``student`` towards ``teacher`` for ``steps`` optimizer steps on ``data``, in place.

    Args:
        student: the calibrated fake-quantized student; kept in eval mode (``requires_grad`` restored after).
        teacher: the frozen float teacher.
        data: ``(image, label or -1)`` items (the calibration images).
        steps: number of optimizer steps (passes repeat as needed).
        objectives: spec strings or an :class:`ObjectiveSet`; default ``kd:T=temperature``.
        lr: Adam learning rate of weights and biases (cosine decay to 0).
        scale_lr: learning rate of the step sizes (default: ``lr``).
        objective_lr: learning rate of the objectives' own parameters (connectors).
        batch_size, seed, device, precision: batches per step, order seed, where and how to run.
        temperature: T of the default objective.
        spec: the teacher's InputSpec (for BSS).
        mixup: mix every batch with itself (module docstring).
        shift, flip: move every image by up to ``shift`` pixels and mirror it with probability 1/2 before mixup
            (module docstring).
        drop_prob: QDrop during fine-tuning: each activation element uses its quantized value with this
            probability, else its full-precision value (1 = off; module docstring).
        progress: tqdm bar.
        log_every: one history row (mean terms) every this many steps, and one at the end.

    Returns:
        History rows ``{"epoch", "step", "lr", **mean terms}`` (terms as :class:`ObjectiveSet` names them).

    Raises:
        ZkdError: ``drop_prob`` outside (0, 1], or an objective :func:`finetune_objectives` refuses.
    """
    if not 0 < drop_prob <= 1:
        raise ZkdError(f"drop_prob must be in (0, 1] (the probability of quantizing an activation element; 1 = "
                       f"QDrop off), got {drop_prob}")
    objset = finetune_objectives(objectives, temperature)
    n = len(data)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, optimizer="adam", weight_decay=0.0,
                         schedule="cosine", seed=seed, precision=precision, log_every=log_every, freeze_bn=True,
                         objective_lr=objective_lr, mixup=mixup, shift=shift, flip=flip)

    def batches(epoch: int) -> list[list[int]]:
        return shuffled_batches(n, batch_size, batch_generator(seed, epoch, "finetune"), drop_last=True)

    act = [layer.aq for _, layer in quant_layers(student) if layer.aq is not None]
    saved = [(q.drop_prob, q.drop_generator) for q in act]
    reseed = None
    if drop_prob < 1:
        gen = device_generator(seed, 0, "finetune-qdrop", device)
        for q in act:
            q.drop_prob, q.drop_generator = 1.0 - drop_prob, gen

        def reseed(step: int) -> None:  # step t's masks depend on (seed, t) only
            gen.manual_seed(batch_seed(seed, step, "finetune-qdrop"))

    try:
        result = train_student(student, teacher.eval(), data, objset, config, device, spec=spec, batches=batches,
                               param_groups=step_size_groups(student, lr, scale_lr),
                               after_step=lambda: clamp_step_sizes(student), before_step=reseed,
                               initial_record=False, progress=progress, tag="finetune")
    finally:  # the student leaves with plain quantizers: QDrop would also drop in evaluation
        for q, (p, g) in zip(act, saved):
            q.drop_prob, q.drop_generator = p, g
    student.eval()
    return result.records
