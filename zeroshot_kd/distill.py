"""``zkd distill``: any student, any data source, any KD objectives, through the one training loop.

This module is distill's *recipe* on top of :func:`zeroshot_kd.training.train_student`: the batch plan (shuffled
batches, or CS-KD's same-class pairs), the per-epoch evaluation and metrics, the checkpoint
(``{"model": state_dict, "zkd": {"format": "zkd-distill-checkpoint", "format_version": 1, ...}}``) and the JSON
card beside it that lets ``load_teacher(out)`` rebuild the student. Under ``torchrun`` the loop runs with
DistributedDataParallel (see :mod:`zeroshot_kd.training`).

Determinism: the student's initialization, the data order and every objective's randomness derive from
``(seed, epoch/step)`` through :func:`zeroshot_kd.runtime.batch_generator`; the metrics hold no timings, so the same
command and seed give the same bytes (on the same device and library versions).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import ZkdError
from .evaluate import evaluate_model
from .io import atomic_write_json
from .modelspec import ModelRecord, build_model
from .models import noskip_card
from .objectives import ObjectiveSet, build
from .runtime import batch_generator, batch_seed
from .teachers import Teacher, load_checkpoint_state, load_teacher
from .training import TrainConfig, shuffled_batches, train_student

__all__ = ["DistillConfig", "build_student", "dataset_labels", "distill", "pair_batches"]


DistillConfig = TrainConfig
"""``zkd distill``'s hyper-parameters: the training loop's :class:`~zeroshot_kd.training.TrainConfig` (same class)."""


_CIFAR_RESNET = re.compile(r"cifar-resnet:(\d+)(?:x(\d+))?$")


def build_student(spec: str, teacher: Teacher, weights: str | None = None, arch: str | None = None,
                  seed: int = 0, device: str | torch.device = "cpu", trust_builders: bool = False
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Build a trainable student for ``teacher`` and the architecture entry for its JSON card.

    ``spec`` is ``cifar-resnet:DEPTH[xWIDTH]`` (a CIFAR ResNet sized to the teacher's channels and classes), or
    anything :func:`zeroshot_kd.load_teacher` accepts (torchvision name, ``module:function``, checkpoint file with its
    card or with ``arch``); models from ``load_teacher`` come frozen, so they are unfrozen and put in train mode here.
    The architecture entry is a :meth:`~zeroshot_kd.modelspec.ModelRecord.to_dict` without weights or input spec
    (the card holds those), so ``load_teacher(out)`` rebuilds the student. ``trust_builders`` is passed to
    ``load_teacher`` for a checkpoint whose card names a builder off the allow-list.
    """
    k, c = teacher.spec.num_classes, teacher.spec.channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_seed(seed, 0, "student-init"))
        m = _CIFAR_RESNET.fullmatch(spec)
        n = spec.startswith("noskip:")
        if n:  # the architecture with every shortcut removed (zeroshot_kd.models.noskip)
            card = noskip_card(spec, c, k)
            record = ModelRecord(card.pop("builder"), card)
        elif m:
            record = ModelRecord("zeroshot_kd.models:cifar_resnet", {
                "depth": int(m.group(1)), "width": int(m.group(2) or 16), "in_channels": c, "num_classes": k})
        if n or m:
            try:
                model: nn.Module = build_model(record)
            except ValueError as e:
                raise ZkdError(f"--student {spec}: {e}") from None
            if weights and weights.lower() != "none":
                try:
                    model.load_state_dict(load_checkpoint_state(weights))
                except RuntimeError as e:
                    raise ZkdError(f"--student-weights {weights} do not fit {spec}: {str(e).splitlines()[0]}") from None
            record = record.with_layers(model)
        else:
            loaded = load_teacher(spec, weights=weights, arch=arch, num_classes=k, trust_builders=trust_builders)
            model, record = loaded.model, loaded.record
            assert record is not None  # load_teacher always records how it built the model
    model.requires_grad_(True).train()
    return model.to(device), record.card_entry()


def dataset_labels(data: Dataset, teacher: nn.Module | None, device: torch.device, batch_size: int = 512
                   ) -> torch.Tensor:
    """Every item's label; unknown labels (-1) are replaced by the teacher's top-1 class."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for x, y in loader:
        y = torch.as_tensor(y).long()
        if bool((y < 0).any()):
            if teacher is None:
                raise ZkdError("the data has unlabeled items and there is no teacher to label them")
            with torch.no_grad():
                pred = teacher(x.to(device)).argmax(1).cpu()
            y = torch.where(y >= 0, y, pred)
        out.append(y)
    return torch.cat(out)


def pair_batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """CS-KD's ``PairBatchSampler``: shuffled anchors, then one random same-class item per anchor (possibly the
    anchor itself); each batch is ``anchors + partners`` (2 x batch_size indices)."""
    n = len(labels)
    order = torch.randperm(n, generator=generator).tolist()
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(c, []).append(i)
    batches = []
    for start in range(0, n, batch_size):
        anchors = order[start:start + batch_size]
        if len(anchors) < 2:
            continue
        picks = torch.rand(len(anchors), generator=generator).tolist()
        partners = []
        for a, u in zip(anchors, picks):
            pool = by_class[int(labels[a])]
            partners.append(pool[min(int(u * len(pool)), len(pool) - 1)])
        batches.append(anchors + partners)
    return batches


def distill(
    teacher: Teacher,
    student: nn.Module,
    data: Dataset,
    objectives: list[str] | ObjectiveSet,
    config: DistillConfig | None = None,
    device: str | torch.device = "cpu",
    out: str | os.PathLike | None = None,
    metrics: str | os.PathLike | None = None,
    eval_data: Dataset | None = None,
    student_card: dict[str, Any] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``student`` from ``teacher`` on ``data`` with the given objectives (under torchrun: DDP).

    Args:
        teacher: the frozen teacher (its input spec defines the data format).
        student: a trainable module accepting the teacher's inputs (see :func:`build_student`).
        data: map-style dataset of ``(normalized image, label or -1)``.
        objectives: spec strings (``["kd:T=4", "rkd"]``) or a built :class:`ObjectiveSet`.
        config: hyper-parameters (``epochs`` or a ``steps`` budget); defaults to ``DistillConfig()``.
        device: torch device for both models.
        out: checkpoint path (format ``zkd-distill-checkpoint``, see :func:`zeroshot_kd.training.write_checkpoint`),
            with a JSON card beside it so that ``load_teacher(out)`` rebuilds the student; written atomically with
            every record (every epoch, or every ``log_every`` steps), by rank 0.
        metrics: JSONL path: one line before training (epoch 0, evaluation only) and one per record.
        eval_data: evaluated before training and with every record (:func:`~zeroshot_kd.evaluate.evaluate_model`:
            top-1/top-5/agreement in percent, KL).
        student_card: the architecture entry for the card (from :func:`build_student`).
        progress: show a tqdm bar with the loss terms on stderr.
        on_epoch: called with each record (rank 0).

    Returns:
        A summary: the config, objective specs, steps, initial/final records and every record after the first.
    """
    cfg = config or DistillConfig()
    if cfg.batch_size < 2:
        raise ZkdError("--batch-size must be >= 2")
    device = torch.device(device)
    specs = [str(o) for o in objectives] if not isinstance(objectives, ObjectiveSet) else None
    objset = objectives if isinstance(objectives, ObjectiveSet) else build(list(objectives))
    fsp_two_stage = [o for o in objset.items if o.name == "fsp" and getattr(o, "two_stage", False)]
    if fsp_two_stage and len(objset.items) == len(fsp_two_stage):
        raise ZkdError("fsp with init_epochs/init_steps trains FSP first and then the other objectives; add one, "
                       "e.g. --objective ce or --objective kd")
    if len(data) < 2:
        raise ZkdError("the data source has fewer than 2 images; a training batch needs at least 2")
    tmodel = teacher.model.to(device).eval()
    labels = dataset_labels(data, tmodel, device) if objset.needs_pairs else None
    n = len(data)

    def batches(epoch: int) -> list[list[int]]:
        g = batch_generator(cfg.seed, epoch, "distill-order")
        return pair_batches(labels, cfg.batch_size, g) if labels is not None else \
            shuffled_batches(n, cfg.batch_size, g)

    meta = {"kind": "distilled-student", "teacher": teacher.source.get("spec"),
            "teacher_sha256": teacher.weights_sha256, "objectives": specs}
    result = train_student(student, tmodel, data, objset, cfg, device, spec=teacher.spec, batches=batches,
                           pairs=labels is not None, eval_data=eval_data, metrics=metrics, checkpoint=out,
                           checkpoint_meta=meta,
                           on_checkpoint=(lambda rec: write_card(out, student_card, teacher.spec, teacher.to_dict(), specs,
                                                                      cfg, rec))
                           if out is not None and student_card is not None else None,
                           on_record=on_epoch, progress=progress, tag="distill")
    records = result.records
    return {"config": cfg.to_dict(), "objectives": specs, "steps": result.steps, "epochs": records[1:],
            "initial": records[0], "final": records[-1], "out": str(out) if out is not None else None,
            "metrics": str(metrics) if metrics is not None else None}


def write_card(out: str | os.PathLike, architecture: dict[str, Any], input_spec: Any, distilled_from: dict[str, Any],
               objectives: list[str] | None, cfg: DistillConfig, last: dict[str, Any], *,
               last_key: str = "last_epoch", extra: dict[str, Any] | None = None) -> None:
    """The JSON card beside a distilled student's checkpoint (``OUT.json``), so ``load_teacher(OUT)`` rebuilds it:
    its architecture record, input spec, teacher, objectives, training config, last record (``last_key``) and its
    top-1 when that record has one. Written by ``zkd distill``, the recipes and adaptive adi."""
    doc: dict[str, Any] = {"architecture": architecture, "input_spec": input_spec.to_dict(),
                           "distilled_from": distilled_from, "objectives": objectives, "config": cfg.to_dict(),
                           **(extra or {}), last_key: last}
    top1 = (last.get("eval") or {}).get("top1")
    if top1 is not None:
        doc["test_accuracy"] = top1          # percent, as the shipped teachers' cards
    atomic_write_json(Path(out).with_suffix(".json"), doc)
