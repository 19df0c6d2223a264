"""The synthesis engine: per-batch optimization, shard output, resume and torchrun distribution.

Work is split into batches ``b = 0 .. ceil(N / batch_size) - 1``. Batch b is a pure function of (teacher, config,
seed, b): its initial noise, targets, jitter and flips all come from a generator seeded by ``(seed, b)``, so the
output bytes do not depend on how many processes ran, in which order, or whether the run was interrupted. Under
torchrun, rank r takes the batches with ``b % world_size == r``; each finished batch is one shard written
atomically with a small record in ``.parts/``; rank 0 merges the records into ``manifest.json`` at the end.

Adaptive adi (:class:`~zeroshot_kd.synthesis.adi.AdaptiveConfig` with ``distill_steps > 0``, one process): the
batches are split into consecutive rounds; after round r's batches the student is trained on every shard so far
and checkpointed as ``.parts/student-round-RRR.pt`` (atomically), so round r + 1's competition term and a resumed
run both use exactly that student; the final student is ``student.pt`` (+ ``student.json`` card when the student
came from a spec).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..version import __version__
from ..bn import BNStatsHook, bns_kl_loss, require_bn
from ..config import Config, require
from ..errors import ZkdError
from ..io import atomic_write_json
from ..preview import write_preview
from ..runtime import (autocast, barrier, batch_generator, deterministic_kernels, dist_env, init_process_group,
                       resolve_device)
from ..shards import FORMAT, FORMAT_VERSION, MANIFEST, shard_name, write_manifest, write_shard
from ..spec import InputSpec
from ..teachers import Teacher, load_teacher
from ..validate import check_finite
from .adi import AdaptiveConfig, competition_loss, round_tag
from .base import Method
from .priors import PRIORS, image_priors, jitter_flip

__all__ = ["BatchResult", "BestTracker", "SynthesisConfig", "make_targets", "optimize_batch", "run_synthesis"]

PARTS = ".parts"
PREVIEW = "preview.png"
STUDENT = "student.pt"


@dataclass
class SynthesisConfig(Config):
    """Everything that determines the output bytes (plus ``precision``, which may change them on GPUs).

    Validated on construction (one-line ZkdError naming the option), recorded in the manifest (``config``) and
    read back by :meth:`from_dict` (resume compares it). ``hyperparameters`` is the method's full set
    (:meth:`~zeroshot_kd.synthesis.base.Method.hyperparameters`); the values present are checked.
    """

    config_name: ClassVar[str] = "synthesis"

    method: str
    num_images: int
    batch_size: int
    seed: int
    targets: str
    hyperparameters: dict[str, Any]
    precision: str = "fp32"

    def __post_init__(self) -> None:
        hp = self.hyperparameters = {k: tuple(v) if isinstance(v, list) else v
                                     for k, v in dict(self.hyperparameters).items()}
        check_finite({f"--{k.replace('_', '-')}": v for k, v in hp.items()})
        require([
            (self.num_images >= 1, f"--num-images must be at least 1, got {self.num_images}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.precision in ("fp32", "bf16", "fp16"),
             f"unknown --precision {self.precision!r}; use fp32, bf16 or fp16"),
            (hp.get("iterations", 0) >= 0, f"--iterations must be >= 0, got {hp.get('iterations')}"),
            (hp.get("lr", 1) > 0, f"--lr must be positive, got {hp.get('lr')}"),
            (hp.get("multires_iterations", 0) >= 0, "--multires-iterations must be >= 0"),
            (hp.get("adi_js", "textbook") in ("textbook", "deepinversion"),
             f"adi_js must be textbook or deepinversion, got {hp.get('adi_js')!r}"),
            (hp.get("jitter") is None or hp["jitter"] >= 0, "--jitter must be >= 0"),
            ("betas" not in hp or (len(tuple(hp["betas"])) == 2 and all(0 <= b < 1 for b in hp["betas"])),
             "--betas needs two values in [0, 1)"),
        ])

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def batch_range(self, b: int) -> range:
        return range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_images))

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``config`` (this key order, tuples as lists), read back by :meth:`from_dict`."""
        d = super().to_dict()
        return {k: d[k] for k in ("method", "num_images", "batch_size", "seed", "targets", "precision",
                                  "hyperparameters")}


@dataclass
class BatchResult:
    """One synthesized batch: the kept images, their labels and the loss record."""

    images: torch.Tensor  # (n, C, H, W) normalized, float32, on CPU
    labels: torch.Tensor  # (n,) int64
    terms: dict[str, float] = field(default_factory=dict)  # last-iteration unweighted loss terms
    best_score: float = float("nan")  # mean over samples of the best per-sample score
    teacher_accuracy: float = float("nan")  # teacher top-1 vs target on the kept images (no augmentation)
    bns_kl: float = float("nan")  # BNS-KL of the kept batch (NaN without BN layers)


def parse_targets(targets: str, num_classes: int) -> list[int] | None:
    """``balanced`` / ``random`` -> None; a comma list of class ids -> the list (validated)."""
    if targets in ("balanced", "random"):
        return None
    try:
        ids = [int(t) for t in targets.split(",") if t.strip()]
    except ValueError:
        raise ZkdError(f"--targets must be balanced, random or a comma list of class ids, got {targets!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if not ids or bad:
        raise ZkdError(f"--targets class ids must lie in 0..{num_classes - 1}; got {bad or targets!r}")
    return ids


def make_targets(cfg: SynthesisConfig, b: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """Targets of batch b: balanced (global index mod K), random (from the batch generator), or a cycled list."""
    idx = torch.tensor(list(cfg.batch_range(b)))
    ids = parse_targets(cfg.targets, num_classes)
    if ids is not None:
        return torch.tensor(ids)[idx % len(ids)]
    if cfg.targets == "random":
        return torch.randint(0, num_classes, (len(idx),), generator=g)
    return idx % num_classes


class BestTracker:
    """Keeps, per sample, a copy of the iterate with the lowest score seen so far."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.detach().clone()
        self.score = torch.full((x.shape[0],), float("inf"), device=x.device)

    def reset(self) -> None:
        self.score.fill_(float("inf"))

    @torch.no_grad()
    def update(self, x: torch.Tensor, score: torch.Tensor) -> None:
        """Record ``x[i]`` for every sample whose ``score[i]`` beats its best (strictly); copies, never aliases."""
        better = score < self.score
        self.score = torch.where(better, score, self.score)
        # torch.where instead of boolean indexing: no host sync on GPUs; the result is a fresh tensor (a copy).
        self.x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x.detach(), self.x)


def _lr_at(base: float, it: int, total: int, warmup: int) -> float:
    """DeepInversion's ``lr_cosine_policy``: linear warm-up, then half a cosine down to 0."""
    if it < warmup:
        return base * (it + 1) / warmup
    e, es = it - warmup, max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def _jitter_pixels(hp: dict[str, Any], spec: InputSpec) -> int:
    return int(hp["jitter"]) if hp["jitter"] is not None else max(1, round(30 * spec.image_size / 224))


def optimize_batch(
    teacher: nn.Module,
    spec: InputSpec,
    method: Method,
    cfg: SynthesisConfig,
    b: int,
    device: torch.device,
    student: nn.Module | None = None,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
) -> BatchResult:
    """Synthesize batch ``b`` (see the module docstring for the determinism contract).

    Keeps, for every sample, the iterate with the lowest per-sample score seen (cloned, not aliased). The score of
    sample i is its own CE, prior and competition terms plus the batch's BN term (shared by the batch, since BN
    statistics are a property of the batch); tracking restarts at a resolution change.
    """
    hp = cfg.hyperparameters
    g = batch_generator(cfg.seed, b)
    n = len(cfg.batch_range(b))
    x0 = torch.randn((n, *spec.shape), generator=g)
    targets_cpu = make_targets(cfg, b, spec.num_classes, g)
    x = x0.to(device)
    if hp["clip"] or not method.optimize:
        x = spec.clamp(x)
    if not method.optimize:
        return _finish(teacher, spec, x, targets_cpu, {}, float("nan"), device, cfg, relabel=True)

    targets = targets_cpu.to(device)
    jitter = _jitter_pixels(hp, spec)
    weights = {"ce": hp["ce_weight"], "bn": hp["bn_weight"], "tv_l1": hp["tv_l1"], "tv_l2": hp["tv_l2"],
               "l2": hp["l2"], "adi": hp["adi_scale"]}
    use_bn = method.bn_loss is not None and weights["bn"] != 0
    priors = [k for k in PRIORS if weights[k]]
    scaler = torch.amp.GradScaler("cuda") if (cfg.precision == "fp16" and device.type == "cuda") else None
    stages = [(hp["multires_iterations"], 2), (hp["iterations"], 1)] if hp["multires_iterations"] else [
        (hp["iterations"], 1)]
    x = x.clone().requires_grad_(True)
    terms: Mapping[str, float] = {}
    best = BestTracker(x)
    # BN statistics only where a BN term is optimized: they cost passes over every BN input, forward and backward.
    with BNStatsHook(teacher if use_bn else nn.Identity()) as hook, deterministic_kernels(device):
        for iters, pool in stages:
            opt = torch.optim.Adam([x], lr=hp["lr"], betas=tuple(hp["betas"]), eps=1e-8)
            warmup = min(int(hp["warmup"]), iters // 4)
            best.reset()  # scores at different resolutions are not comparable
            for it in range(iters):
                for group in opt.param_groups:
                    group["lr"] = _lr_at(hp["lr"], it, iters, warmup)
                xin = F.avg_pool2d(x, pool) if pool > 1 else x
                xin = jitter_flip(xin, max(jitter // pool, 0), hp["flip"], g)
                hook.clear()
                with autocast(device, cfg.precision):
                    logits = teacher(xin).float()
                parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
                if weights["ce"]:
                    ce_i = F.cross_entropy(logits, targets, reduction="none")
                    parts["ce"] = (ce_i.mean(), ce_i.detach())
                if use_bn:
                    parts["bn"] = (method.bn_loss(hook.stats, hp["first_bn_multiplier"]), None)
                if priors:
                    parts.update(image_priors(xin, priors))
                if weights["adi"] and student is not None:
                    with autocast(device, cfg.precision):
                        s_logits = student(xin).float()
                    parts["adi"] = competition_loss(s_logits, logits, hp["adi_temperature"], hp["adi_js"])
                loss = sum(weights[k] * v for k, (v, _) in parts.items())
                with torch.no_grad():
                    score = torch.zeros(n, device=device)
                    for k, (v, per) in parts.items():
                        score += weights[k] * (per if per is not None else v.detach())
                    best.update(x, score)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if hp["clip"]:
                    with torch.no_grad():
                        x.copy_(spec.clamp(x))
                # Read on demand: one device-to-host transfer for all terms, only when someone reads them.
                terms = _LazyTerms([*parts, "total"], torch.stack([v.detach() for v, _ in parts.values()]
                                                                  + [loss.detach()]))
                if on_iteration is not None:
                    on_iteration(it, terms)
    # Without a CE term the targets never shaped the images: label them by the teacher instead.
    return _finish(teacher, spec, best.x, targets_cpu, dict(terms), float(best.score.mean()), device, cfg,
                   relabel=not weights["ce"])


class _LazyTerms(Mapping):
    """One iteration's loss terms as floats, copied to the host (a GPU sync) on the first read of a value, so a
    progress display that reads them every 10 iterations syncs only then."""

    def __init__(self, names: list[str], values: torch.Tensor) -> None:
        self._names, self._values, self._floats = names, values, None

    def _read(self) -> dict[str, float]:
        if self._floats is None:
            self._floats = dict(zip(self._names, self._values.tolist()))
        return self._floats

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@torch.no_grad()
def _finish(teacher: nn.Module, spec: InputSpec, x: torch.Tensor, labels: torch.Tensor, terms: dict[str, float],
            best_score: float, device: torch.device, cfg: SynthesisConfig, relabel: bool = False) -> BatchResult:
    """Measure the kept batch as stored (float16 round trip, no augmentation): teacher accuracy and BNS-KL.

    With ``relabel`` the labels become the teacher's argmax on the stored images (methods without a CE term).
    """
    stored = x.detach().to(torch.float16).float()
    with BNStatsHook(teacher) as hook, autocast(device, cfg.precision):
        logits = teacher(stored).float()
    predicted = logits.argmax(1).cpu()
    if relabel:
        labels = predicted
    acc = float((predicted == labels.cpu()).float().mean())
    kl = float(bns_kl_loss(hook.stats)) if hook.stats else float("nan")
    return BatchResult(x.detach().float().cpu(), labels.cpu(), terms, best_score, acc, kl)


def _load_student(spec: str | nn.Module | None, teacher_spec: InputSpec, device: torch.device) -> nn.Module | None:
    if spec is None:
        return None
    if isinstance(spec, nn.Module):
        return spec.eval().to(device)
    t = load_teacher(spec, device=device, image_size=teacher_spec.image_size, channels=teacher_spec.channels,
                     num_classes=teacher_spec.num_classes)
    return t.model


def _prepare_output(out: Path, config: dict[str, Any], resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse a non-empty folder unless resuming (with identical settings) or overwriting."""
    if out.exists() and not out.is_dir():
        raise ZkdError(f"--out {out} exists and is not a folder; choose another --out")
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    cfg_path = out / PARTS / "config.json"
    if existing and not (resume or overwrite):
        raise ZkdError(f"output folder {out} is not empty; pass --resume to continue it or --overwrite to replace it")
    if existing and resume:
        if not cfg_path.is_file():
            raise ZkdError(f"cannot --resume {out}: it was not written by 'zkd synthesize' (no {PARTS}/config.json); "
                           "use --overwrite or another --out")
        with open(cfg_path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise ZkdError(f"cannot --resume {out}: it was made with different settings ({', '.join(diff)}); "
                           "use the same options, or --overwrite")
    barrier()  # every rank has checked the folder before rank 0 changes it
    if is_main:
        if existing and overwrite and not resume:
            for p in existing:
                ours = p.name in (PARTS, MANIFEST, PREVIEW, STUDENT, "student.json")
                if ours or p.name.startswith(("shard-", ".shard-")):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".shard-*.tmp*"):  # left by an interrupted run
            tmp.unlink()
        atomic_write_json(cfg_path, config)
    barrier()


def _done_batches(out: Path) -> dict[int, dict[str, Any]]:
    """Batches whose shard and record are both complete (the record is written after the shard is renamed)."""
    done = {}
    for rec_path in sorted((out / PARTS).glob("shard-*.json")):
        try:
            with open(rec_path) as f:
                rec = json.load(f)
        except (json.JSONDecodeError, OSError):
            continue
        shard = out / rec["file"]
        if shard.is_file() and shard.stat().st_size == rec["bytes"]:
            done[rec["batch"]] = rec
    return done


def run_synthesis(
    out: str | Path,
    teacher: Teacher,
    method: Method,
    cfg: SynthesisConfig,
    device: torch.device,
    student: str | nn.Module | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    adaptive: AdaptiveConfig | None = None,
) -> dict[str, Any]:
    """Synthesize ``cfg.num_images`` images into ``out`` and return the manifest (see :func:`zeroshot_kd.synthesize`).

    Args:
        adaptive: adi's synthesize-distill loop (see the module docstring); None or ``distill_steps == 0``: the
            student is a fixed snapshot.
    """
    t_start = time.time()
    env = dist_env()
    adaptive = adaptive or AdaptiveConfig()
    if (adaptive.active or adaptive.rounds > 1) and not method.needs_student:
        raise ZkdError(f"--rounds and --distill-steps only apply to --method adi, not {method.name}; drop them or use "
                       "--method adi")
    if adaptive.active and env.world_size > 1:
        raise ZkdError("adaptive adi (--distill-steps) runs in one process; run it without torchrun")
    rounds = adaptive.round_batches(cfg.num_batches) if adaptive.active else [range(cfg.num_batches)]
    joined = init_process_group(device)
    try:
        out = Path(out)
        if method.bn_loss is not None and cfg.hyperparameters["bn_weight"]:
            require_bn(teacher.model, f"--method {method.name}")
        card = None
        if adaptive.active:
            if student is None:
                raise ZkdError("--distill-steps needs --student SPEC (the student to train); add --student")
            student_model, card = _trainable_student(student, teacher, cfg.seed, device)
        else:
            student_model = _load_student(student, teacher.spec, device) if method.needs_student else None
        if method.needs_student and student_model is None and cfg.hyperparameters["adi_scale"]:
            raise ZkdError("--method adi needs --student SPEC (a model to compete against), or --adi-scale 0")
        parse_targets(cfg.targets, teacher.spec.num_classes)
        config = {"config": cfg.to_dict(), "teacher_weights_sha256": teacher.weights_sha256,
                  "input_spec": teacher.spec.to_dict(), "student": _describe(student)}
        if adaptive.active:  # absent otherwise: fixed-snapshot runs keep their config (and --resume) as before
            config["adaptive"] = adaptive.to_dict()
        _prepare_output(out, config, resume, overwrite, env.is_main)
        done = _done_batches(out)
        show = progress and env.is_main
        # Rank 0's bar counts every rank's batches, assuming the ranks keep pace with each other.
        bar = tqdm(total=cfg.num_batches, initial=len(done), desc=method.name, unit="batch", disable=not show,
                   dynamic_ncols=True)
        inner = tqdm(total=cfg.hyperparameters["iterations"] + cfg.hyperparameters["multires_iterations"],
                     desc="iterations", unit="it", leave=False, disable=not show or not method.optimize,
                     dynamic_ncols=True)

        def on_iteration(it: int, terms: dict[str, float]) -> None:
            inner.update(1)
            if it % 10 == 0:
                inner.set_postfix({k: f"{v:.3g}" for k, v in terms.items()}, refresh=False)

        round_log: list[dict[str, Any]] = []
        for r, round_range in enumerate(rounds):
            for b in [b for b in round_range if b % env.world_size == env.rank and b not in done]:
                t0 = time.time()
                inner.reset()
                res = optimize_batch(teacher.model, teacher.spec, method, cfg, b, device, student_model, on_iteration)
                keys = [f"{i:08d}" for i in cfg.batch_range(b)]
                name = shard_name(b)
                sha = write_shard(out / name, keys, res.images, res.labels.tolist(), teacher.spec)
                record = {"batch": b, "file": name, "count": len(keys), "sha256": sha,
                          "bytes": (out / name).stat().st_size, "labels": res.labels.tolist(), "terms": res.terms,
                          "best_score": res.best_score, "teacher_accuracy": res.teacher_accuracy, "bns_kl": res.bns_kl,
                          "seconds": time.time() - t0}
                atomic_write_json(out / PARTS / name.replace(".tar", ".json"), record)
                bar.update(min(env.world_size, bar.total - bar.n))
                bar.set_postfix(acc=f"{res.teacher_accuracy:.2f}", bns_kl=f"{res.bns_kl:.3g}", refresh=False)
            if adaptive.active:
                assert student_model is not None
                round_log.append(_train_round(out, r, range(round_range.stop), teacher, student_model, adaptive, cfg,
                                              device, show))
                if log:
                    rec = round_log[-1]
                    log(f"round {r + 1}/{len(rounds)}: {rec['images']} images, {rec['step']} distill steps, "
                        f"loss {rec.get('loss')}")
        inner.close()
        bar.close()
        barrier()
        manifest: dict[str, Any] = {}
        if env.is_main:
            extra: dict[str, Any] = {}
            if adaptive.active:
                assert student_model is not None
                _write_student(out, teacher, student_model, card, adaptive, cfg, round_log)
                extra = {"adaptive": {**adaptive.to_dict(), "rounds_log": round_log, "student": STUDENT}}
            manifest = _write_manifest(out, teacher, cfg, device, student, env.world_size, time.time() - t_start,
                                       extra)
            write_preview(out, teacher.spec, manifest, class_names=teacher.classes)
            if log:
                log(f"wrote {manifest['num_images']} images in {len(manifest['shards'])} shards to {out}")
        barrier()
        if not env.is_main:
            with open(out / MANIFEST) as f:
                manifest = json.load(f)
        return manifest
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _trainable_student(student: str | nn.Module, teacher: Teacher, seed: int, device: torch.device
                       ) -> tuple[nn.Module, dict[str, Any] | None]:
    """The student the adaptive loop trains, frozen and in eval mode for synthesis, and its card entry.

    A spec is built by :func:`zeroshot_kd.distill.build_student` (seeded initialization, ``cifar-resnet:...``,
    ``noskip:...`` or any teacher spec); a module is deep-copied (the caller's is never trained) and has no card.
    """
    if isinstance(student, nn.Module):
        import copy

        model, card = copy.deepcopy(student).to(device), None
    else:
        from ..distill import build_student

        model, card = build_student(student, teacher, seed=seed, device=device)
    return model.requires_grad_(False).eval(), card


def round_checkpoint(out: str | Path, r: int) -> Path:
    """Where round r's student lives (written atomically after its training, read back by ``--resume``)."""
    return Path(out) / PARTS / f"student-round-{r:03d}.pt"


def stored_images(out: str | Path, batches: range, spec: InputSpec) -> torch.utils.data.TensorDataset:
    """The images and labels of ``batches`` as stored in their shards (float16 values), each shard verified against
    its record's sha256: the data of a round's training, identical in a fresh and in a resumed run."""
    from ..shards import ShardDataset, decode_npy

    done = _done_batches(Path(out))
    xs, ys = [], []
    for b in batches:
        if b not in done:
            raise ZkdError(f"batch {b} is missing in {out}; re-run with --resume")
        path = Path(out) / done[b]["file"]
        ShardDataset.verify_shard(path, done[b]["sha256"])
        with open(path, "rb") as f:
            for _, offset, size, label, _ in ShardDataset.index_shard(path, spec):
                f.seek(offset)
                xs.append(decode_npy(f.read(size)).float())
                ys.append(label)
    return torch.utils.data.TensorDataset(torch.stack(xs), torch.tensor(ys, dtype=torch.long))


def _train_round(out: Path, r: int, batches: range, teacher: Teacher, student: nn.Module, adaptive: AdaptiveConfig,
                 cfg: SynthesisConfig, device: torch.device, progress: bool) -> dict[str, Any]:
    """Round r's distillation: train ``student`` in place on ``batches``' stored images, or restore it from the
    round's checkpoint when a previous run finished the round. Returns the round's record (no timings)."""
    from ..training import read_checkpoint, train_student, write_checkpoint

    ckpt = round_checkpoint(out, r)
    if ckpt.is_file():
        state, meta = read_checkpoint(ckpt)
        student.load_state_dict(state)
        return dict(meta["round_record"])
    data = stored_images(out, batches, teacher.spec)
    result = train_student(student, teacher.model, data, list(adaptive.objectives),
                           adaptive.train_config(cfg.seed, cfg.precision), device, spec=teacher.spec,
                           param_groups=[{"params": list(student.parameters())}], initial_record=False,
                           progress=progress, tag=round_tag(r))
    final = result.final or {}
    record = {"round": r, "train_batches": [batches.start, batches.stop], "images": len(data), "step": result.steps,
              **{k: v for k, v in final.items() if k not in ("epoch", "step", "eval")}}
    write_checkpoint(ckpt, student, {"kind": "adi-round-student", "round": r, "round_record": record})
    return record


def _write_student(out: Path, teacher: Teacher, student: nn.Module, card: dict[str, Any] | None,
                   adaptive: AdaptiveConfig, cfg: SynthesisConfig, round_log: list[dict[str, Any]]) -> None:
    """``out/student.pt`` in ``zkd distill``'s checkpoint format, with its card when the student came from a spec
    (so ``load_teacher(out/student.pt)`` and ``zkd evaluate`` load it)."""
    from ..distill import write_card
    from ..training import write_checkpoint

    steps = sum(rec["step"] for rec in round_log)
    specs = list(adaptive.objectives)
    write_checkpoint(out / STUDENT, student, {"kind": "distilled-student", "teacher": teacher.source.get("spec"),
                                              "teacher_sha256": teacher.weights_sha256, "objectives": specs,
                                              "synthesis": "adi", "rounds": adaptive.rounds, "epoch": 1,
                                              "step": steps})
    if card is not None:
        write_card(out / STUDENT, card, teacher.spec, teacher.to_dict(), specs,
                   adaptive.train_config(cfg.seed, cfg.precision), {"rounds": round_log, "step": steps})


def _describe(student: str | nn.Module | None) -> str | None:
    if student is None or isinstance(student, str):
        return student
    return type(student).__name__


def _write_manifest(out: Path, teacher: Teacher, cfg: SynthesisConfig, device: torch.device,
                    student: str | nn.Module | None, world_size: int, wall: float,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    done = _done_batches(out)
    missing = [b for b in range(cfg.num_batches) if b not in done]
    if missing:
        raise ZkdError(f"{len(missing)} batch(es) missing in {out} (first: {missing[0]}); re-run with --resume")
    records = [done[b] for b in range(cfg.num_batches)]
    counts: dict[str, int] = {}
    for r in records:
        for y in r["labels"]:
            counts[str(y)] = counts.get(str(y), 0) + 1
    term_names = sorted({k for r in records for k in r["terms"]})
    weights = [r["count"] for r in records]

    def wmean(key: str, sub: str | None = None) -> float | None:
        vals = [(r[key][sub] if sub else r[key]) for r in records if (sub is None or sub in r[key])]
        vals = [v for v in vals if v == v]  # drop NaN
        return sum(vals) / len(vals) if vals else None

    import torchvision

    labels_are_targets = bool(cfg.method != "gaussian" and cfg.hyperparameters["ce_weight"])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"zeroshot_kd {__version__}",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "teacher": teacher.to_dict(),
        "input_spec": teacher.spec.to_dict(),
        "method": cfg.method,
        "hyperparameters": cfg.to_dict()["hyperparameters"],
        "student": _describe(student),
        "seed": cfg.seed,
        "targets": cfg.targets,
        "labels": "targets" if labels_are_targets else "teacher argmax (the method has no CE term)",
        "num_images": sum(weights),
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "device": str(device),
        "world_size": world_size,
        "storage": {"tensor": "float16 .npy, normalized input space (source of truth)",
                    "image": "8-bit PNG preview (denormalized, clamped, rounded)", "label": ".cls ASCII class id"},
        "class_counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        "final_loss": {k: wmean("terms", k) for k in term_names},
        # With teacher-argmax labels the teacher agrees with every label by construction: no quality measure then.
        "quality": {"teacher_accuracy": (sum(r["teacher_accuracy"] * r["count"] for r in records) / sum(weights)
                                         if labels_are_targets else None),
                    "bns_kl": wmean("bns_kl"), "best_score": wmean("best_score")},
        "batch_seconds": sum(r["seconds"] for r in records),
        "wall_time_s": wall,
        "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"], "batch": r["batch"]}
                   for r in records],
        **(extra or {}),
    }
    return write_manifest(out, manifest)
