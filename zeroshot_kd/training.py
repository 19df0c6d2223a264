"""The one KD training loop: ``zkd distill`` and ``zkd calibrate``'s fine-tuning both train through it.

One step: the frozen teacher and the student see the same batch (features captured by the objectives' hooks), the
objectives give ``(loss, terms)`` in float32, and one optimizer steps the student *and* the objective-owned
parameters (OFD/FSP connectors, KDCL peers). Around that: an optimizer + schedule factory (SGD/Adam, cosine/constant,
param groups with their own learning rates, e.g. LSQ step sizes), autocast precision with a GradScaler for fp16 on
CUDA, a tqdm bar, a JSONL metrics file, atomic checkpoints, and a budget in epochs or in steps.

Distributed (``torchrun``): each rank joins the process group (gloo on CPU, nccl on CUDA), the student and the
objectives are wrapped in one :class:`~torch.nn.parallel.DistributedDataParallel` module, and every *global* batch
of the 1-process plan is split into ``world_size`` contiguous slices, one per rank. DDP averages gradients over the
ranks, so each rank's loss is scaled by ``world_size * B_rank / B`` first: the all-reduced gradient is then the
gradient of the global batch mean, as in the 1-process run, also when ``B`` is not divisible by the world size.
Logged terms are all-reduced the same way; rank 0 alone evaluates, writes metrics and checkpoints.

Equality with 1 process (to float tolerance) holds for objectives that are means of per-sample terms (kd, ce, ls,
tfkd-*, ofd, fsp, ifm, ...), with ``shift`` / ``flip`` too (their moves are drawn for the global batch); ``mixup``
pairs images within each rank's slice. Batch-relational objectives (rkd, sp, pkt, cskd's pairs, bss's attacked
subset, kdcl's ensemble) see each rank's slice as their batch, as in any DDP training. BatchNorm in train mode
normalizes with the batch's statistics: on CUDA the student's BatchNorm layers become
:class:`~torch.nn.SyncBatchNorm` (global-batch statistics, ``sync_bn=True``); PyTorch has no SyncBatchNorm on CPU,
so there BN in train mode uses each rank's slice (a warning says so) unless ``freeze_bn`` keeps the student in eval
mode, where BN uses its running statistics and sharding changes nothing.

Determinism: the batch order and the global RNG derive from ``(seed, epoch)`` through
:func:`zeroshot_kd.runtime.batch_generator` / :func:`~zeroshot_kd.runtime.batch_seed`, never from the rank; metrics
hold no timings, so the same command and seed give the same bytes (on the same device and library versions).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .augment import mixup_batch, shift_flip_batch
from .config import Config, option, require
from .errors import ZkdError
from .evaluate import evaluate_model
from .io import atomic_write_bytes, safe_torch_load
from .objectives import ObjectiveRunner, ObjectiveSet, build
from .runtime import autocast, batch_generator, batch_seed, dist_env, init_process_group

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TrainConfig", "TrainResult", "make_optimizer",
           "make_schedule", "read_checkpoint", "shard_batch", "shuffled_batches", "train_student",
           "write_checkpoint"]

CHECKPOINT_FORMAT = "zkd-distill-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig(Config):
    """Hyper-parameters of :func:`train_student` (and of ``zkd distill``, which records them in its card).

    Attributes:
        epochs: passes over the data (ignored when ``steps`` is set).
        steps: optimizer steps; when set, passes repeat (each with its own order) until this many steps are done.
        batch_size: images per *global* step (anchors per step for CS-KD, which adds as many partners).
        lr: peak learning rate of the student's parameters.
        optimizer: ``sgd`` (momentum 0.9, nesterov) or ``adam`` (AdamW; with ``weight_decay=0`` it is Adam).
        weight_decay: L2 weight decay (SGD) / decoupled (AdamW).
        schedule: ``cosine`` (decay to 0 over all steps) or ``constant``; applies to every param group.
        seed: base seed.
        precision: autocast dtype for forwards (fp32, bf16, fp16); losses stay float32.
        eval_batch_size: batch size of the evaluation passes.
        workers: DataLoader worker processes (0: in-process).
        log_every: one metrics record every this many steps (and at the end); None: one per epoch.
        freeze_bn: keep the student in eval mode while training (BN uses and keeps its running statistics;
            dropout is off), as fake-quantized fine-tuning does.
        sync_bn: under torchrun on CUDA, train BN with global-batch statistics (SyncBatchNorm).
        objective_lr: learning rate of the objective-owned parameters (connectors, peers); None: ``lr``.
        mixup: mix every batch with a permutation of itself before the teacher and the student see it
            (:func:`zeroshot_kd.augment.mixup_batch`, drawn from ``(seed, step)``); not with CS-KD's pairs.
        shift: translate every image by up to this many pixels (edges replicated) before the teacher and the
            student see it (:func:`zeroshot_kd.augment.shift_flip_batch`, drawn from ``(seed, step)``, before
            mixup); 0 = off.
        flip: mirror every image left-right with probability 1/2, with ``shift``'s draws.
    """

    config_name: ClassVar[str] = "training"

    epochs: int = option(1, "", min=1)
    steps: int | None = option(None, "Budget in optimizer steps instead of --epochs (passes repeat as needed).",
                               kind="int", min=1)
    batch_size: int = option(128, "", min=1)
    lr: float = option(0.05, "Peak learning rate (cosine decay).", min=0, min_open=True)
    optimizer: str = option("sgd", "", choices=("sgd", "adam"))
    weight_decay: float = option(5e-4, "", min=0)
    schedule: str = option("cosine", "", choices=("cosine", "constant"))
    seed: int = 0
    precision: str = "fp32"
    eval_batch_size: int = 512
    workers: int = option(0, "DataLoader workers.", min=0)
    log_every: int | None = None
    freeze_bn: bool = option(False, "Train with the student in eval mode: BatchNorm uses and keeps its running "
                             "statistics (no dropout); under torchrun on CPU this makes the result equal to one "
                             "process.")
    sync_bn: bool = True
    objective_lr: float | None = None
    mixup: bool = option(False, "Mix each batch with a permutation of itself (x' = lam x + (1 - lam) x[perm], lam ~ "
                         "U(0,1) per image; the teacher answers on x'). Regularizes KD on a few or synthetic images.")
    shift: int = option(0, "Translate each image by up to this many pixels (edges replicated; the teacher answers on "
                        "the moved image); 0 = off.", min=0)
    flip: bool = option(False, "Mirror each image left-right with probability 1/2 (the teacher answers on the "
                        "mirrored image).")

    def __post_init__(self) -> None:
        require([(self.epochs >= 1, "--epochs must be >= 1"),
                 (self.steps is None or self.steps >= 1, "--steps must be >= 1"),
                 (self.batch_size >= 1, "--batch-size must be >= 1"),
                 (self.lr > 0, "--lr must be > 0"), (self.weight_decay >= 0, "--weight-decay must be >= 0"),
                 (self.optimizer in ("sgd", "adam"), f"unknown optimizer {self.optimizer!r}; use sgd or adam"),
                 (self.schedule in ("cosine", "constant"),
                  f"unknown schedule {self.schedule!r}; use cosine or constant"),
                 (self.precision in ("fp32", "bf16", "fp16"),
                  f"unknown precision {self.precision!r}; use fp32, bf16 or fp16"),
                 (self.eval_batch_size >= 1, "eval batch size must be >= 1"),
                 (self.workers >= 0, "--workers must be >= 0"),
                 (self.log_every is None or self.log_every >= 1, "log_every must be >= 1"),
                 (self.objective_lr is None or self.objective_lr > 0, "objective_lr must be > 0")])
        self.check_fields()


@dataclass
class TrainResult:
    """What :func:`train_student` returns: every metrics record (initial one first, if any) and the step count."""

    records: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    initial: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, Any] | None:
        return self.records[-1] if self.records else None


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, nesterov) or AdamW over ``groups``; a group without ``lr`` gets ``config.lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
                  ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step multiplier of every group's lr: ``0.5 (1 + cos(pi s / total))`` (cosine) or 1 (constant)."""
    total = max(1, total_steps)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total)
                                                                                          / total)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, min_size: int = 2,
                     drop_last: bool = False) -> list[list[int]]:
    """One pass: a random permutation of ``range(n)`` cut into batches; batches under ``min_size`` are dropped,
    and with ``drop_last`` every incomplete batch is (one batch of all items when ``n < batch_size``)."""
    order = torch.randperm(n, generator=generator).tolist()
    if drop_last:
        stop = n - batch_size + 1 if n >= batch_size else 1
        return [order[i:i + batch_size] for i in range(0, stop, batch_size)]
    return [b for b in (order[i:i + batch_size] for i in range(0, n, batch_size)) if len(b) >= min_size]


def shard_batch(indices: Sequence[int], rank: int, world_size: int, pairs: bool = False) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch (sizes differ by at most one, larger slices first).

    With ``pairs`` the batch is ``anchors + partners`` and each half is sliced alike, so every rank keeps its
    anchors' partners.
    """
    if pairs:
        half = len(indices) // 2
        return shard_batch(indices[:half], rank, world_size) + shard_batch(indices[half:], rank, world_size)
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(indices[start:start + base + (1 if rank < extra else 0)])


def write_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``{"model": state_dict (CPU), "zkd": {"format", "format_version", **meta}}`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    doc = {"model": state, "zkd": {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **meta}}
    buf = io.BytesIO()       # via memory: the zip's record prefix is then "archive", not the output's file name
    torch.save(doc, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a training checkpoint; checkpoints from before the format field read as version 0.

    Raises:
        ZkdError: unreadable file, another format, or a newer format version than this zkd knows.
    """
    obj = safe_torch_load(path, "cannot read checkpoint {path} ({error}); is it a zkd distill checkpoint?",
                          missing="checkpoint {path} does not exist")
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ZkdError(f"{path} is not a zkd distill checkpoint (no 'model' state dict)")
    meta = dict(obj.get("zkd") or {})
    fmt = meta.get("format", CHECKPOINT_FORMAT)
    version = meta.get("format_version", 0)
    if fmt != CHECKPOINT_FORMAT:
        raise ZkdError(f"{path} is a {fmt!r} file, not a zkd distill checkpoint")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ZkdError(f"unknown distill checkpoint format version {version} in {path}; upgrade zkd")
    meta.setdefault("format", CHECKPOINT_FORMAT)
    meta.setdefault("format_version", 0)
    return obj["model"], meta


class _KDStep(nn.Module):
    """The student's forward plus the objectives, as one module, so one DDP wrapper covers the student and the
    objective-owned parameters and every extra forward an objective makes (BSS, KDCL) happens inside it."""

    def __init__(self, student: nn.Module, objectives: ObjectiveSet, runner: ObjectiveRunner,
                 device: torch.device, precision: str) -> None:
        super().__init__()
        self.student, self.objectives = student, objectives
        self._runner, self._device, self._precision = [runner], device, precision   # list: not a submodule

    def forward(self, x: torch.Tensor, t_logits: torch.Tensor | None, step_fields: dict[str, Any]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        with autocast(self._device, self._precision):
            s_logits = self.student(x)
        if t_logits is not None and s_logits.shape != t_logits.shape:
            raise ZkdError(f"student outputs {tuple(s_logits.shape[1:])} but the teacher {tuple(t_logits.shape[1:])}; "
                           "build the student for the teacher's classes")
        batch = self._runner[0].make_batch(s_logits.float(), t_logits, x, **step_fields)
        return self.objectives(batch)


def _round(terms: dict[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.6g}") for k, v in terms.items()}


def _warn(msg: str) -> None:
    print(f"zkd: warning: {msg}", file=sys.stderr)


def train_student(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Dataset,
    objectives: ObjectiveSet | Sequence[str],
    config: TrainConfig,
    device: torch.device | str = "cpu",
    *,
    spec: Any = None,
    batches: Callable[[int], list[list[int]]] | None = None,
    pairs: bool = False,
    param_groups: list[dict[str, Any]] | None = None,
    after_step: Callable[[], None] | None = None,
    before_step: Callable[[int], None] | None = None,
    eval_data: Dataset | None = None,
    initial_record: bool = True,
    metrics: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    tag: str = "train",
) -> TrainResult:
    """Train ``student`` against ``teacher`` on ``data`` with KD objectives; in place, under torchrun too.

    Args:
        student: the trainable module (on ``device``); its mode is restored at the end.
        teacher: the frozen teacher, or None when no objective needs one.
        data: map-style dataset of ``(normalized image, label or -1)``.
        objectives: spec strings (``["kd:T=4", "rkd"]``) or a built :class:`ObjectiveSet`.
        config: hyper-parameters (budget in ``epochs`` or ``steps``).
        device: torch device of both models.
        spec: the teacher's InputSpec (BSS keeps attacked inputs in its range).
        batches: ``batches(epoch) -> [[index, ...], ...]``, the global batches of one pass (the 1-process order);
            default :func:`shuffled_batches` with ``batch_generator(seed, epoch, f"{tag}-order")``. Every pass must
            have the same number of batches. Under torchrun, a global batch with fewer items (anchors) than ranks is
            skipped (only a ragged last batch can be that small).
        pairs: the batches are ``anchors + partners`` (CS-KD): partners' logits become ``batch.pair_logits``.
        param_groups: optimizer groups of the student's parameters (a group may set its own ``lr``); default one
            group of every student parameter that requires grad. Their ``requires_grad`` is set for the run and
            restored afterwards. The objectives' own parameters are added as one more group (``objective_lr``).
        after_step: called after every optimizer step (e.g. clamp LSQ step sizes).
        before_step: called with the step index before the step's forwards (e.g. reseed a per-step random stream).
        eval_data: evaluated with :func:`zeroshot_kd.evaluate.evaluate_model` (percent) in every record, and with
            the teacher alone in the initial record.
        initial_record: emit a record before training (epoch 0, step 0; evaluation only).
        metrics: JSONL path, rewritten atomically with every record (rank 0).
        checkpoint: path written with every record by :func:`write_checkpoint` (rank 0), ``checkpoint_meta`` plus
            the record's epoch and step in its ``zkd`` entry; then ``on_checkpoint(record)`` (e.g. a JSON card).
        on_record: called with each record (rank 0).
        progress: tqdm bar with the loss terms (rank 0).
        tag: salt of the global RNG seed and of the default batch order.

    Returns:
        The records and the number of steps. Records hold ``epoch`` (1-based pass of the last step), ``step``,
        ``lr`` (first group), the mean of each loss term since the previous record, and ``eval`` if asked.

    Raises:
        ZkdError: the student cannot run on the teacher's inputs, no batch in a pass, a non-finite loss.
    """
    from tqdm import tqdm

    cfg = config
    device = torch.device(device)
    env = dist_env()
    world, rank, main = env.world_size, env.rank, env.is_main
    objset = objectives if isinstance(objectives, ObjectiveSet) else build(list(objectives))
    if batches is None:
        def batches(epoch: int) -> list[list[int]]:
            return shuffled_batches(len(data), cfg.batch_size, batch_generator(cfg.seed, epoch, f"{tag}-order"))
    if pairs and cfg.mixup:
        raise ZkdError("--mixup does not combine with CS-KD's image pairs; drop one of them")
    first = batches(0)
    if not first:
        raise ZkdError(f"{len(data)} items make no training batch of batch size {cfg.batch_size}; give more data")
    total_steps = cfg.steps if cfg.steps is not None else len(first) * cfg.epochs

    joined = init_process_group(device) if world > 1 else False
    was_training = student.training
    if param_groups is None:
        param_groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    own = [p for g in param_groups for p in g["params"]]
    flags = [p.requires_grad for p in own]
    for p in own:
        p.requires_grad_(True)
    mode = not cfg.freeze_bn
    if world > 1 and mode and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        if device.type == "cuda" and cfg.sync_bn:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        elif main:
            _warn("BatchNorm in train mode under torchrun on CPU normalizes with each rank's slice of the batch "
                  "(PyTorch has no CPU SyncBatchNorm); results differ from 1 process; --freeze-bn avoids it")
    student.to(device).train(mode)
    objset = objset.to(device)
    runner = ObjectiveRunner(objset, student, teacher, spec, cfg.seed)
    try:
        example = data[0][0].unsqueeze(0).repeat(2, *[1] * data[0][0].dim()).to(device)
        try:
            runner.setup(example)
        except RuntimeError as e:
            shape = tuple(spec.shape) if spec is not None and hasattr(spec, "shape") else tuple(example.shape[1:])
            raise ZkdError(f"the student cannot run on the teacher's inputs {shape}: "
                           f"{str(e).splitlines()[0]}") from None
        objset.to(device).train(mode)
        extra = list(runner.extra_parameters())
        groups = [dict(g) for g in param_groups]
        if extra:
            groups.append({"params": extra, "lr": cfg.objective_lr or cfg.lr})
        opt = make_optimizer(groups, cfg)
        sched = make_schedule(opt, cfg, total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=(cfg.precision == "fp16" and device.type == "cuda"))
        step_module: nn.Module = _KDStep(student, objset, runner, device, cfg.precision)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            two_stage = any(getattr(o, "two_stage", False) for o in objset.items)
            step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                              broadcast_buffers=False, find_unused_parameters=two_stage)
        tmodel = teacher.eval() if teacher is not None else None

        result = TrainResult()
        lines: list[str] = []

        def emit(rec: dict[str, Any]) -> None:
            result.records.append(rec)
            if not main:
                return
            lines.append(json.dumps(rec, sort_keys=True))
            if metrics is not None:
                atomic_write_bytes(metrics, ("\n".join(lines) + "\n").encode())
            if checkpoint is not None and rec["step"] > 0:
                write_checkpoint(checkpoint, student, {**(checkpoint_meta or {}), "epoch": rec["epoch"],
                                                       "step": rec["step"]})
                if on_checkpoint is not None:
                    on_checkpoint(rec)
            if on_record is not None:
                on_record(rec)

        def evaluation() -> dict[str, Any]:
            return evaluate_model(student, eval_data, device, cfg.eval_batch_size, tmodel, cfg.precision,
                                  progress=False)

        if initial_record:
            rec0: dict[str, Any] = {"epoch": 0, "step": 0}
            if eval_data is not None and main:
                rec0["eval"] = evaluation()
                if tmodel is not None:
                    rec0["teacher_eval"] = evaluate_model(tmodel, eval_data, device, cfg.eval_batch_size, None,
                                                          cfg.precision, progress=False)
            result.initial = rec0
            emit(rec0)

        torch.manual_seed(batch_seed(cfg.seed, 0, f"{tag}-train"))
        step = 0
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(total=total_steps, desc=tag, disable=not (progress and main), leave=False, dynamic_ncols=True)
        last_epoch = 0
        try:
            for epoch in itertools.count():
                if step >= total_steps or (cfg.steps is None and epoch >= cfg.epochs):
                    break
                plan = first if epoch == 0 else batches(epoch)
                plan = [b for b in plan if (len(b) // 2 if pairs else len(b)) >= world]
                for o in objset.items:
                    if hasattr(o, "set_epoch"):
                        o.set_epoch(epoch)
                local = [shard_batch(b, rank, world, pairs) for b in plan] if world > 1 else plan
                loader = DataLoader(data, batch_sampler=local, num_workers=cfg.workers)
                last_epoch = epoch + 1
                if cfg.steps is None:
                    bar.set_description(f"{tag} epoch {epoch + 1}/{cfg.epochs}", refresh=False)
                for gb, (x, y) in zip(plan, loader):
                    if step >= total_steps:
                        break
                    x, y = x.to(device, non_blocking=True), torch.as_tensor(y).long().to(device)
                    if cfg.shift or cfg.flip:  # drawn for the global batch: a rank moves its slice as 1 process
                        where = shard_batch(range(len(gb)), rank, world, pairs) if world > 1 else None
                        x = shift_flip_batch(x, batch_generator(cfg.seed, step, f"{tag}-shift"), cfg.shift, cfg.flip,
                                             len(gb), where)
                    if cfg.mixup:
                        x, y = mixup_batch(x, y, batch_generator(cfg.seed, step, f"{tag}-mixup"))
                    b_global = len(gb) // 2 if pairs else len(gb)
                    if before_step is not None:
                        before_step(step)
                    pair_logits = None
                    if pairs:
                        half = x.shape[0] // 2
                        x, xp, y = x[:half], x[half:], y[:half]
                    t_logits = None
                    if tmodel is not None:
                        with torch.no_grad(), autocast(device, cfg.precision):
                            t_logits = tmodel(x).float()
                    if pairs:
                        with torch.no_grad(), runner.s_capture.paused(), autocast(device, cfg.precision):
                            pair_logits = student(xp).float()
                    fields_ = {"labels": y, "pair_logits": pair_logits, "epoch": epoch, "step": step,
                               "progress": step / total_steps}
                    loss, terms = step_module(x, t_logits, fields_)
                    share = x.shape[0] / b_global
                    if world > 1:
                        import torch.distributed as dist

                        keys = sorted(terms)
                        vec = torch.tensor([terms[k] * share for k in keys], dtype=torch.float64,
                                           device=device if device.type == "cuda" else "cpu")
                        dist.all_reduce(vec)
                        terms = dict(zip(keys, vec.tolist()))
                    if not math.isfinite(terms["loss"]):
                        raise ZkdError(f"the loss became {terms['loss']} at step {step} ({_round(terms)}); lower "
                                       "--lr or the objective weights")
                    opt.zero_grad(set_to_none=True)
                    if loss.requires_grad:
                        scaler.scale(loss * (world * share) if world > 1 else loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    if after_step is not None:
                        after_step()
                    sched.step()
                    step += 1
                    count += 1
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items() if "." not in k}, refresh=False)
                    if cfg.log_every is not None and (count == cfg.log_every or step == total_steps):
                        emit(_record(epoch + 1, step, sched, sums, count, eval_data is not None and main,
                                     evaluation))
                        sums, count = {}, 0
                if cfg.log_every is None and count:
                    emit(_record(epoch + 1, step, sched, sums, count, eval_data is not None and main, evaluation))
                    sums, count = {}, 0
            if count:
                emit(_record(last_epoch, step, sched, sums, count, eval_data is not None and main, evaluation))
        finally:
            bar.close()
        result.steps = step
        if world > 1:
            import torch.distributed as dist

            dist.barrier()     # rank 0's files exist before any rank returns
        return result
    finally:
        runner.close()
        for p, f in zip(own, flags):
            p.requires_grad_(f)
        student.train(was_training)
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _record(epoch: int, step: int, sched: Any, sums: dict[str, float], count: int, with_eval: bool,
            evaluation: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    rec: dict[str, Any] = {"epoch": epoch, "step": step, "lr": float(f"{sched.get_last_lr()[0]:.6g}"),
                           **_round({k: v / count for k, v in sums.items()})}
    if with_eval:
        rec["eval"] = evaluation()
    return rec
