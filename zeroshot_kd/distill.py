"""The generic student training loop behind ``zkd distill``: any student, any data source, any KD objectives.

One step: the frozen teacher and the student see the same batch (features captured by hooks), the objectives
give ``(loss, terms)``, the optimizer steps (student plus objective-owned parameters such as OFD connectors or
KDCL peers). After every epoch the student is evaluated (top-1 accuracy where labels exist, and agreement with
the teacher's top-1), one JSON line is appended to the metrics file, and the checkpoint is written atomically.

Determinism: the student's initialization, the data order and every objective's randomness derive from
``(seed, epoch/step)`` through :func:`zeroshot_kd.runtime.batch_generator`; the metrics hold no timings, so the same
command and seed give the same bytes (on the same device and library versions).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import ZkdError
from .io import atomic_write_bytes, atomic_write_json
from .objectives import ObjectiveRunner, ObjectiveSet, build
from .objectives.base import KDBatch
from .runtime import autocast, batch_generator, batch_seed
from .teachers import Teacher, load_teacher

__all__ = ["DistillConfig", "build_student", "dataset_labels", "distill", "evaluate", "pair_batches"]


@dataclass
class DistillConfig:
    """Training hyper-parameters of :func:`distill`.

    Attributes:
        epochs: passes over the data.
        batch_size: images per step (anchors per step for CS-KD, which adds as many partners).
        lr: peak learning rate (cosine decay to 0 over all steps unless ``schedule="constant"``).
        optimizer: ``sgd`` (momentum 0.9, nesterov) or ``adam``.
        weight_decay: L2 weight decay (SGD) / decoupled (AdamW).
        schedule: ``cosine`` or ``constant``.
        seed: base seed.
        precision: autocast dtype for forwards (fp32, bf16, fp16); losses stay float32.
        eval_batch_size: batch size of the evaluation passes.
        workers: DataLoader worker processes (0: in-process).
    """

    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    precision: str = "fp32"
    eval_batch_size: int = 512
    workers: int = 0


_CIFAR_RESNET = re.compile(r"cifar-resnet:(\d+)(?:x(\d+))?$")


def build_student(spec: str, teacher: Teacher, weights: str | None = None, arch: str | None = None,
                  seed: int = 0, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build a trainable student for ``teacher`` and the architecture entry for its JSON card.

    ``spec`` is ``cifar-resnet:DEPTH[xWIDTH]`` (a CIFAR ResNet sized to the teacher's channels and classes), or
    anything :func:`zeroshot_kd.load_teacher` accepts (torchvision name, ``module:function``, checkpoint file);
    models from ``load_teacher`` come frozen, so they are unfrozen and put in train mode here.
    """
    k, c = teacher.spec.num_classes, teacher.spec.channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_seed(seed, 0, "student-init"))
        m = _CIFAR_RESNET.fullmatch(spec)
        if spec.startswith("noskip:"):  # the architecture with every shortcut removed (zeroshot_kd.models.noskip)
            from .models import noskip, noskip_card
            from .teachers import load_checkpoint_state

            card = noskip_card(spec, c, k)
            try:
                model = noskip(**{key: v for key, v in card.items() if key != "builder"})
                if weights and weights.lower() != "none":
                    model.load_state_dict(load_checkpoint_state(weights))
            except (ValueError, RuntimeError) as e:
                raise ZkdError(f"--student {spec}: {str(e).splitlines()[0]}") from None
        elif m:
            from .models import cifar_resnet

            depth, width = int(m.group(1)), int(m.group(2) or 16)
            try:
                model: nn.Module = cifar_resnet(depth, width, in_channels=c, num_classes=k)
            except ValueError as e:
                raise ZkdError(f"--student {spec}: {e}") from None
            card = {"builder": "zeroshot_kd.models:cifar_resnet", "depth": depth, "width": width,
                    "in_channels": c, "num_classes": k}
            if weights and weights.lower() != "none":
                from .teachers import load_checkpoint_state

                try:
                    model.load_state_dict(load_checkpoint_state(weights))
                except RuntimeError as e:
                    raise ZkdError(f"--student-weights {weights} do not fit {spec}: {str(e).splitlines()[0]}") from None
        else:
            loaded = load_teacher(spec, weights=weights, arch=arch, num_classes=k)
            model = loaded.model
            src = loaded.source
            if src.get("kind") == "torchvision":
                card = {"builder": "torchvision.models:get_model", "name": spec, "num_classes": k}
            elif src.get("kind") == "module":
                card = {"builder": spec, "num_classes": k}
            elif src.get("kind") in ("file", "builtin"):
                path = Path(spec) if src["kind"] == "file" else None
                card_file = path.with_suffix(".json") if path is not None else None
                if card_file is not None and card_file.is_file():
                    card = json.loads(card_file.read_text())["architecture"]
                elif src["kind"] == "builtin":
                    from .teachers import assets_dir

                    card = json.loads((assets_dir() / f"{spec}.json").read_text())["architecture"]
                else:
                    card = {"builder": str(arch)}
            else:  # pragma: no cover - load_teacher has no other kinds
                card = {"builder": spec}
    model.requires_grad_(True).train()
    return model.to(device), card


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


def _plain_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size) if len(order[i:i + batch_size]) >= 2]


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module | None, data: Dataset, device: torch.device,
             batch_size: int = 512, precision: str = "fp32") -> dict[str, float]:
    """Top-1 accuracy on labeled items and top-1 agreement with the teacher, in eval mode (mode restored)."""
    was = student.training
    student.eval()
    correct = labeled = agree = total = 0
    try:
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            with autocast(device, precision):
                s = student(x).float().argmax(1)
                t = teacher(x).float().argmax(1) if teacher is not None else None
            mask = y >= 0
            correct += int((s[mask] == y[mask]).sum())
            labeled += int(mask.sum())
            if t is not None:
                agree += int((s == t).sum())
            total += len(x)
    finally:
        student.train(was)
    out: dict[str, float] = {}
    if labeled:
        out["accuracy"] = correct / labeled
    if teacher is not None and total:
        out["agreement"] = agree / total
    return out


def _optimizer(params: list[nn.Parameter], cfg: DistillConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ZkdError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")


def _round(terms: dict[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.6g}") for k, v in terms.items()}


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
    """Train ``student`` from ``teacher`` on ``data`` with the given objectives.

    Args:
        teacher: the frozen teacher (its input spec defines the data format).
        student: a trainable module accepting the teacher's inputs (see :func:`build_student`).
        data: map-style dataset of ``(normalized image, label or -1)``.
        objectives: spec strings (``["kd:T=4", "rkd"]``) or a built :class:`ObjectiveSet`.
        config: hyper-parameters; defaults to :class:`DistillConfig()`.
        device: torch device for both models.
        out: checkpoint path (``{"model": state_dict, "zkd": {...}}``), with a JSON card beside it so that
            ``load_teacher(out)`` rebuilds the student; written atomically after every epoch.
        metrics: JSONL path: one line before training (epoch 0, evaluation only) and one per epoch.
        eval_data: evaluated before training and after each epoch (accuracy and teacher agreement).
        student_card: the architecture entry for the card (from :func:`build_student`).
        progress: show a tqdm bar with the loss terms on stderr.
        on_epoch: called with each epoch's record.

    Returns:
        A summary: the config, objective specs, steps, first/last epoch records.
    """
    from tqdm import tqdm

    cfg = config or DistillConfig()
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ZkdError("--epochs must be >= 1 and --batch-size >= 2")
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
    student = student.to(device).train()
    objset = objset.to(device)
    runner = ObjectiveRunner(objset, student, tmodel, teacher.spec, cfg.seed)
    try:
        try:
            runner.setup(data[0][0].unsqueeze(0).repeat(2, 1, 1, 1).to(device))
        except RuntimeError as e:
            raise ZkdError(f"the student cannot run on the teacher's inputs {tuple(teacher.spec.shape)}: "
                           f"{str(e).splitlines()[0]}") from None
        objset.to(device).train()
        params = [p for p in student.parameters() if p.requires_grad] + list(runner.extra_parameters())
        opt = _optimizer(params, cfg)
        labels = dataset_labels(data, tmodel, device) if objset.needs_pairs else None
        n = len(data)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total_steps = max(1, steps_per_epoch * cfg.epochs)
        if cfg.schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps)
                                                                                   / total_steps)))
        elif cfg.schedule == "constant":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        else:
            raise ZkdError(f"unknown schedule {cfg.schedule!r}; use cosine or constant")
        scaler = torch.amp.GradScaler(device.type, enabled=(cfg.precision == "fp16" and device.type == "cuda"))
        lines: list[str] = []
        records: list[dict[str, Any]] = []

        def emit(rec: dict[str, Any]) -> None:
            records.append(rec)
            lines.append(json.dumps(rec, sort_keys=True))
            if metrics is not None:
                atomic_write_bytes(metrics, ("\n".join(lines) + "\n").encode())
            if on_epoch is not None:
                on_epoch(rec)

        rec0: dict[str, Any] = {"epoch": 0, "step": 0}
        if eval_data is not None:
            rec0["eval"] = evaluate(student, tmodel, eval_data, device, cfg.eval_batch_size, cfg.precision)
            rec0["teacher_eval"] = evaluate(tmodel, None, eval_data, device, cfg.eval_batch_size, cfg.precision)
        emit(rec0)
        torch.manual_seed(batch_seed(cfg.seed, 0, "distill-train"))
        step = 0
        for epoch in range(cfg.epochs):
            g = batch_generator(cfg.seed, epoch, "distill-order")
            if labels is not None:
                batches = pair_batches(labels, cfg.batch_size, g)
            else:
                batches = _plain_batches(n, cfg.batch_size, g)
            loader = DataLoader(data, batch_sampler=batches, num_workers=cfg.workers)
            sums: dict[str, float] = {}
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False,
                       dynamic_ncols=True)
            for x, y in bar:
                x, y = x.to(device, non_blocking=True), torch.as_tensor(y).long().to(device)
                pair_logits = None
                if labels is not None:
                    half = x.shape[0] // 2
                    x, xp, y = x[:half], x[half:], y[:half]
                with torch.no_grad(), autocast(device, cfg.precision):
                    t_logits = tmodel(x).float()
                with autocast(device, cfg.precision):
                    s_logits = student(x)
                s_feats, t_feats = runner.take_features()
                if s_logits.shape != t_logits.shape:
                    raise ZkdError(f"student outputs {tuple(s_logits.shape[1:])} but the teacher "
                                   f"{tuple(t_logits.shape[1:])}; build the student for the teacher's classes")
                if labels is not None:
                    with torch.no_grad(), runner.s_capture.paused(), autocast(device, cfg.precision):
                        pair_logits = student(xp).float()
                batch = KDBatch(student_logits=s_logits.float(), teacher_logits=t_logits, inputs=x, labels=y,
                                student_features=s_feats, teacher_features=t_feats, student=student, teacher=tmodel,
                                pair_logits=pair_logits, epoch=epoch, step=step, progress=step / total_steps,
                                seed=cfg.seed, spec=teacher.spec)
                loss, terms = objset(batch)
                if not math.isfinite(terms["loss"]):
                    raise ZkdError(f"the loss became {terms['loss']} at step {step} ({_round(terms)}); lower --lr "
                                   "or the objective weights")
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                step += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items() if "." not in k}, refresh=False)
            bar.close()
            nb = max(len(batches), 1)
            rec: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": float(f"{sched.get_last_lr()[0]:.6g}"),
                                   **_round({k: v / nb for k, v in sums.items()})}
            if eval_data is not None:
                rec["eval"] = evaluate(student, tmodel, eval_data, device, cfg.eval_batch_size, cfg.precision)
            if out is not None:
                _save(out, student, teacher, student_card, specs, cfg, rec)
            emit(rec)
        return {"config": asdict(cfg), "objectives": specs, "steps": step, "epochs": records[1:],
                "initial": records[0], "final": records[-1], "out": str(out) if out is not None else None,
                "metrics": str(metrics) if metrics is not None else None}
    finally:
        runner.close()


def _save(out: str | os.PathLike, student: nn.Module, teacher: Teacher, card: dict[str, Any] | None,
          specs: list[str] | None, cfg: DistillConfig, rec: dict[str, Any]) -> None:
    out = Path(out)
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    meta = {"kind": "distilled-student", "teacher": teacher.source.get("spec"),
            "teacher_sha256": teacher.weights_sha256, "objectives": specs, "epoch": rec["epoch"]}
    buf = io.BytesIO()       # via memory: the zip's record prefix is then "archive", not the output's file name
    torch.save({"model": state, "zkd": meta}, buf)
    atomic_write_bytes(out, buf.getvalue())
    if card is not None:
        doc: dict[str, Any] = {"architecture": card, "input_spec": teacher.spec.to_dict(),
                               "distilled_from": teacher.to_dict(), "objectives": specs, "config": asdict(cfg),
                               "last_epoch": rec}
        if "eval" in rec and "accuracy" in rec["eval"]:
            doc["test_accuracy"] = rec["eval"]["accuracy"]
        atomic_write_json(out.with_suffix(".json"), doc)
