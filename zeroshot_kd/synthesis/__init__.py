"""Data-free image synthesis from a frozen teacher: ``synthesize(...)`` and the method registry.

Methods (``--method``): ``gaussian``, ``inception``, ``bns``, ``deepinversion``, ``adi``; see each module's docstring
for its loss, defaults and where it departs from the paper or the authors' code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ZkdError
from ..runtime import resolve_device
from ..teachers import Teacher, load_teacher
from ..validate import check_teacher_input
from . import adi, bns, deepinversion, gaussian, inception
from .adi import AdaptiveConfig
from .base import COMMON_DEFAULTS, Method
from .engine import SynthesisConfig, optimize_batch, run_synthesis

__all__ = ["AdaptiveConfig", "COMMON_DEFAULTS", "METHODS", "Method", "SynthesisConfig", "get_method", "optimize_batch",
           "synthesize"]

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (gaussian, inception, bns, deepinversion, adi)}


def get_method(name: str) -> Method:
    """Look up a method by its ``--method`` name."""
    if name not in METHODS:
        raise ZkdError(f"unknown synthesis method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def synthesize(
    out: str | Path,
    teacher: str | Teacher | None = None,
    method: str = "deepinversion",
    num_images: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    targets: str = "balanced",
    device: str = "auto",
    precision: str = "fp32",
    student: str | nn.Module | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    rounds: int = 1,
    distill_steps: int = 0,
    distill_lr: float = 0.05,
    distill_batch_size: int = 64,
    distill_objectives: tuple[str, ...] | list[str] = ("kd",),
    **hyperparameters: Any,
) -> dict[str, Any]:
    """Synthesize images from a frozen teacher and write them as shards + manifest + preview into ``out``.

    Args:
        out: output folder; refused when not empty unless ``resume`` or ``overwrite``.
        teacher: a :class:`~zeroshot_kd.teachers.Teacher` or a spec for :func:`~zeroshot_kd.load_teacher`
            (None = the shipped Fashion-MNIST teacher).
        method: one of :data:`METHODS`.
        num_images: how many images in total.
        batch_size: images optimized together (BN statistics are batch statistics, so this changes the result).
        seed: base seed; batch b uses a generator seeded from (seed, b) only.
        targets: ``balanced`` (class = global index mod K), ``random``, or a comma list of class ids (cycled).
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the forward passes; BN statistics and losses stay
            float32.
        student: model to compete against for ``adi`` (spec or module).
        resume: continue an interrupted run with identical settings (finished shards are kept).
        overwrite: delete a previous run's files in ``out`` first.
        progress: show tqdm bars (rank 0 only).
        log: callback for human-readable messages.
        rounds: adi only: synthesis rounds of the adaptive loop (1 = one round, today's fixed snapshot when
            ``distill_steps`` is 0). Each round synthesizes its share of the batches against the current student.
        distill_steps: adi only: student training steps (KD from the teacher, :func:`~zeroshot_kd.train_student`)
            after each round, on every image so far; > 0 also writes ``out/student.pt`` (+ card for a spec student).
            See :class:`~zeroshot_kd.synthesis.adi.AdaptiveConfig`.
        distill_lr: adi only: peak learning rate of each round's training (SGD, cosine over the round).
        distill_batch_size: adi only: images per training step.
        distill_objectives: adi only: the training objectives (``zkd distill --objective`` specs).
        **hyperparameters: overrides of the method's defaults (see :data:`COMMON_DEFAULTS`), e.g. ``iterations``,
            ``lr``, ``bn_weight``, ``first_bn_multiplier``, ``ce_weight``, ``tv_l1``, ``tv_l2``, ``l2``, ``jitter``,
            ``flip``, ``adi_scale``, ``adi_temperature``, ``adi_js``, ``multires_iterations``, ``warmup``, ``clip``.

    Returns:
        The manifest written to ``out/manifest.json``.
    """
    m = get_method(method)
    try:
        hp = m.hyperparameters(hyperparameters)
    except KeyError as e:
        raise ZkdError(f"unknown hyper-parameter {e.args[0]!r}; valid: {', '.join(sorted(COMMON_DEFAULTS))}") from None
    cfg = SynthesisConfig(method, num_images, batch_size, seed, targets, hp, precision)  # validates, one line
    adaptive = AdaptiveConfig.from_options(rounds, distill_steps, distill_lr, distill_batch_size, distill_objectives)
    if (adaptive.active or rounds > 1) and not m.needs_student:
        raise ZkdError(f"--rounds and --distill-steps only apply to --method adi, not {method}; drop them or use "
                       "--method adi")
    if adaptive.active:  # before any output exists
        adaptive.round_batches(math.ceil(num_images / batch_size))
    dev = resolve_device(device)
    t = _on_device(teacher, dev) if isinstance(teacher, Teacher) else load_teacher(teacher, device=dev)
    check_teacher_input(t.model, t.spec, multires=bool(hp["multires_iterations"]))  # before any output exists
    return run_synthesis(out, t, m, cfg, dev, student=student, resume=resume, overwrite=overwrite,
                         progress=progress, log=log, adaptive=adaptive)


def _on_device(teacher: Teacher, dev: torch.device) -> Teacher:
    """The teacher with its model on ``dev``: the caller's object when already there, else a moved copy (the
    caller's Teacher is never mutated)."""
    tensors = list(teacher.model.parameters()) + list(teacher.model.buffers())
    if all(p.device == dev or (p.device.type == dev.type and dev.index is None) for p in tensors):
        return teacher
    return dataclasses.replace(teacher, model=copy.deepcopy(teacher.model).to(dev))
