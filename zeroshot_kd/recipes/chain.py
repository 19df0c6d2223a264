"""Teacher-assistant chains: teacher -> assistant_1 -> ... -> assistant_m -> student, one distillation per stage.

TAKD (Mirzadeh et al., AAAI 2020) observes that a small student distilled from a much larger teacher can do worse
than one distilled through a *teacher assistant* of intermediate size, and that longer chains help further. IFM's
auxiliary network (Passalis et al., CVPR 2020) is the same mechanism with one assistant shaped like the student
but wider: it learns from the teacher with KD, and the student learns from it with the information-flow loss, whose
layer matching then pairs layers of like networks.

Stage ``k`` (1-based) trains ``specs[k-1]`` with :func:`zeroshot_kd.distill.distill` on the same data, config and
seed; its teacher is stage ``k-1``'s student, reloaded frozen (eval mode, no gradients) from ``OUT/stage-{k-1}.pt``
(stage 1's teacher is the given teacher). Every stage writes ``OUT/stage-k.pt`` with its JSON card (so
``load_teacher("OUT/stage-k.pt")`` rebuilds it) and ``OUT/stage-k.jsonl``; ``OUT/chain.json`` records the plan and
each finished stage's final record. With ``resume`` the stages that ``chain.json`` lists as finished are loaded, not
trained again; an interrupted stage restarts from its beginning. The last stage's checkpoint is the student.

Objectives: every stage gets the given objectives, except that ``ifm`` applies only to the last stage (the earlier
stages drop it; a stage left with no objective uses ``kd``), as in IFM's recipe.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .. import distill as _distill
from ..errors import ZkdError
from ..io import atomic_write_json
from ..teachers import Teacher, load_teacher
from ..training import TrainConfig

__all__ = ["CHAIN_FORMAT", "ChainStage", "chain_plan", "distill_chain", "stage_objectives", "wider_spec"]

CHAIN_FORMAT = "zkd-distill-chain"
WIDER = "wider-of-student"

_CIFAR = re.compile(r"cifar-resnet:(\d+)(?:x(\d+))?$")
# torchvision's own wide variants: the same Bottleneck layout with twice the inner width (Zagoruyko & Komodakis).
_TV_WIDE = {"resnet50": "wide_resnet50_2", "resnet101": "wide_resnet101_2"}


def wider_spec(student: str, factor: int = 2) -> str:
    """The spec of a network shaped like ``student`` but ``factor`` times wider (IFM's auxiliary network).

    "Wider" keeps the depth and block layout and multiplies every layer's channel count:

    - ``cifar-resnet:DxW`` -> ``cifar-resnet:Dx(factor*W)`` (``W`` defaults to 16), also under ``noskip:``;
    - torchvision ``resnet50`` / ``resnet101`` -> ``wide_resnet50_2`` / ``wide_resnet101_2`` (factor 2 only: twice
      the Bottleneck's inner width, torchvision's definition of wide).

    Raises:
        ZkdError: a spec where "wider" is undefined (e.g. torchvision's BasicBlock ResNets, whose width is fixed,
            checkpoint files, module:function builders).
    """
    if factor < 2:
        raise ZkdError(f"the wider factor must be >= 2, got {factor}")
    prefix = "noskip:" if student.startswith("noskip:") else ""
    arch = student[len(prefix):]
    m = _CIFAR.fullmatch(arch)
    if m:
        return f"{prefix}cifar-resnet:{m.group(1)}x{factor * int(m.group(2) or 16)}"
    if arch in _TV_WIDE and factor == 2:
        return prefix + _TV_WIDE[arch]
    raise ZkdError(f"--assistant {WIDER} is undefined for --student {student} (defined for cifar-resnet:DEPTHxWIDTH "
                   f"and torchvision {', '.join(_TV_WIDE)}); pass --assistant SPEC explicitly")


@dataclass(frozen=True)
class ChainStage:
    """One stage of a chain: the model trained in it, its objectives, and where it is written."""

    index: int           # 1-based
    spec: str            # the student spec of this stage (build_student form)
    objectives: tuple[str, ...]
    checkpoint: Path
    metrics: Path

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "spec": self.spec, "objectives": list(self.objectives),
                "checkpoint": self.checkpoint.name, "metrics": self.metrics.name}


def stage_objectives(objectives: Sequence[str], last: bool) -> list[str]:
    """The objectives of one stage: all of them on the last stage; without ``ifm`` before it (``kd`` if empty)."""
    specs = [str(o) for o in objectives] or ["kd"]
    if last:
        return specs
    kept = [o for o in specs if o.split(":", 1)[0].strip() != "ifm"]
    return kept or ["kd"]


def chain_plan(student: str, assistants: Sequence[str], objectives: Sequence[str], out_dir: str | os.PathLike
               ) -> list[ChainStage]:
    """The stages of teacher -> assistants -> student, in training order (``wider-of-student`` resolved)."""
    specs = [wider_spec(student) if a == WIDER else a for a in assistants] + [student]
    out = Path(out_dir)
    return [ChainStage(k, s, tuple(stage_objectives(objectives, k == len(specs))), out / f"stage-{k}.pt",
                       out / f"stage-{k}.jsonl") for k, s in enumerate(specs, 1)]


def _frozen(path: Path, device: torch.device) -> Teacher:
    t = load_teacher(str(path), device=device)
    t.model.to(device).eval().requires_grad_(False)
    return t


def distill_chain(
    teacher: Teacher,
    student: str,
    assistants: Sequence[str],
    data: Dataset,
    objectives: Sequence[str],
    config: TrainConfig,
    out_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    eval_data: Dataset | None = None,
    resume: bool = False,
    progress: bool = True,
    on_record: Callable[[ChainStage, dict[str, Any]], None] | None = None,
    on_stage: Callable[[ChainStage, dict[str, Any], bool], None] | None = None,
) -> dict[str, Any]:
    """Train the chain teacher -> ``assistants`` -> ``student`` (see the module docstring); one call.

    Args:
        teacher: the frozen teacher of stage 1.
        student: the final student's spec (any :func:`zeroshot_kd.distill.build_student` form).
        assistants: assistant specs in order, from the teacher's side; ``wider-of-student`` is
            :func:`wider_spec` of ``student``. Empty: a direct distillation (the same as ``zkd distill``).
        data: the training data of every stage.
        objectives: objective specs (``ifm`` on the last stage only, see :func:`stage_objectives`).
        config: hyper-parameters of every stage (same seed: a stage is identified by its model and teacher).
        out_dir: folder of ``stage-k.pt`` / ``.json`` / ``.jsonl`` and ``chain.json`` (created).
        device: torch device.
        eval_data: evaluated before and during every stage (accuracy in the stage's JSONL and in the summary).
        resume: skip the stages ``chain.json`` records as finished (same plan required), loading their checkpoints.
        progress: tqdm bars.
        on_record: called with ``(stage, record)`` for each metrics record of a stage being trained.
        on_stage: called with ``(stage, summary, skipped)`` when a stage is done or skipped.

    Returns:
        ``{"format", "plan", "config", "stages": [per-stage {"index", "spec", "objectives", "checkpoint",
        "final", "skipped"}], "student": last checkpoint}``.

    Raises:
        ZkdError: ``resume`` with a ``chain.json`` of another plan, a missing checkpoint of a finished stage, or any
            error of the stages themselves.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    plan = chain_plan(student, assistants, objectives, out)
    state_path = out / "chain.json"
    doc: dict[str, Any] = {"format": CHAIN_FORMAT, "format_version": 1, "teacher": teacher.to_dict(),
                           "plan": [s.to_dict() for s in plan], "config": config.to_dict(), "finished": []}
    finished: list[dict[str, Any]] = []
    if resume and state_path.is_file():
        try:
            old = json.loads(state_path.read_text())
        except (OSError, ValueError):
            raise ZkdError(f"{state_path} is unreadable; delete it or run without --resume") from None
        same = {k: old.get(k) for k in ("format", "plan", "config")} == {k: doc[k] for k in ("format", "plan", "config")}
        if not same or old.get("teacher", {}).get("weights_sha256") != teacher.weights_sha256:
            raise ZkdError(f"{state_path} records another chain (stages, objectives, config or teacher differ); use "
                           "another --out or run without --resume")
        finished = list(old.get("finished") or [])
    doc["finished"] = finished
    atomic_write_json(state_path, doc)

    stages: list[dict[str, Any]] = []
    current = teacher
    for stage in plan:
        done = next((f for f in finished if f.get("index") == stage.index), None)
        if done is not None:
            if not stage.checkpoint.is_file():
                raise ZkdError(f"stage {stage.index} is recorded as finished but {stage.checkpoint} is missing; run "
                               "without --resume")
            summary = {**stage.to_dict(), "final": done.get("final"), "skipped": True}
            stages.append(summary)
            if on_stage is not None:
                on_stage(stage, summary, True)
            current = _frozen(stage.checkpoint, device)
            continue
        model, card = _distill.build_student(stage.spec, current, seed=config.seed, device=device)
        res = _distill.distill(current, model, data, list(stage.objectives), config, device, out=stage.checkpoint,
                               metrics=stage.metrics, eval_data=eval_data, student_card=card, progress=progress,
                               on_epoch=(lambda rec, s=stage: on_record(s, rec)) if on_record is not None else None)
        finished.append({"index": stage.index, "spec": stage.spec, "final": res["final"]})
        atomic_write_json(state_path, {**doc, "finished": finished})
        summary = {**stage.to_dict(), "final": res["final"], "skipped": False}
        stages.append(summary)
        if on_stage is not None:
            on_stage(stage, summary, False)
        del model
        current = _frozen(stage.checkpoint, device)
    return {"format": CHAIN_FORMAT, "plan": [s.to_dict() for s in plan], "config": config.to_dict(),
            "stages": stages, "student": str(plan[-1].checkpoint)}
