"""Running objectives on real models: feature hooks, the one-time dry run, and one :class:`KDBatch` per step.

The training loop (:func:`zeroshot_kd.training.train_student`) owns the forwards and the optimizer; the runner binds
the objectives to the models and assembles what they read.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ZkdError
from ..runtime import batch_seed
from .base import KDBatch, ObjectiveSet
from .capture import FeatureCapture

__all__ = ["ObjectiveRunner"]


class ObjectiveRunner:
    """Binds an :class:`ObjectiveSet` to a student and a teacher: resolves layers, registers the forward hooks,
    builds adapters from a dry run, and assembles a :class:`KDBatch` per step.

    Args:
        objectives: the weighted objectives.
        student: the model being trained (hooks are added, nothing else changes).
        teacher: the frozen teacher, or None when no objective needs one.
        spec: the teacher's input spec (BSS keeps attacked inputs inside its valid range).
        seed: the run's base seed, passed to objectives that draw randomness.
    """

    def __init__(self, objectives: ObjectiveSet, student: nn.Module, teacher: nn.Module | None,
                 spec: Any = None, seed: int = 0) -> None:
        self.objectives, self.student, self.teacher, self.spec, self.seed = objectives, student, teacher, spec, seed
        if teacher is None and objectives.needs_teacher:
            needing = [o.name for o in objectives.items if o.needs_teacher]
            raise ZkdError(f"objective(s) {', '.join(needing)} need a teacher")
        objectives.bind(student, teacher)           # before hooks: peers/self-teachers are hook-free copies
        s_req, t_req = objectives.feature_requests()
        self.s_capture = FeatureCapture(student, s_req)
        self.t_capture = FeatureCapture(teacher, t_req) if teacher is not None else None
        self.ready = not (s_req or t_req)

    def setup(self, example_inputs: torch.Tensor) -> None:
        """One forward of both models in eval mode (no statistics change) to size the adapters."""
        modes = [(m, m.training) for m in (self.student, self.teacher) if m is not None]
        try:
            for m, _ in modes:
                m.eval()
            with torch.no_grad():
                self.student(example_inputs)
                if self.teacher is not None:
                    self.teacher(example_inputs)
            s_feats = self.s_capture.take()
            t_feats = self.t_capture.take() if self.t_capture is not None else {}
            devices = [example_inputs.device] if example_inputs.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):      # adapters' init depends on the seed only
                torch.manual_seed(batch_seed(self.seed, 0, "objective-setup"))
                self.objectives.setup(s_feats, t_feats)
        finally:
            for m, mode in modes:
                m.train(mode)
            self.s_capture.clear()
            if self.t_capture is not None:
                self.t_capture.clear()
        self.ready = True

    def extra_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters owned by the objectives (connectors, KDCL peers): give them to the optimizer."""
        return (p for p in self.objectives.parameters() if p.requires_grad)

    def make_batch(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, inputs: torch.Tensor,
                   labels: torch.Tensor | None = None, pair_logits: torch.Tensor | None = None, epoch: int = 0,
                   step: int = 0, progress: float = 0.0) -> KDBatch:
        """The :class:`KDBatch` of one step, with the features the hooks captured during the caller's forwards.

        If a model's last forward was on another batch than ``inputs`` (its features would belong to other images),
        that model is run again on ``inputs`` first: the teacher under ``no_grad``, the student with gradients.
        """
        if not self.ready:
            self.setup(inputs[:2])
        s_cap, t_cap = self.s_capture, self.t_capture
        if s_cap._handles and not _same_batch(s_cap.last_input, inputs):
            self.student(inputs)
        if t_cap is not None and t_cap._handles and not _same_batch(t_cap.last_input, inputs):
            with torch.no_grad():
                self.teacher(inputs)
        s_feats, t_feats = self.take_features()
        s_cap.clear()
        if t_cap is not None:
            t_cap.clear()
        return KDBatch(student_logits=student_logits, teacher_logits=teacher_logits, inputs=inputs, labels=labels,
                       student_features=s_feats, teacher_features=t_feats, student=self.student,
                       teacher=self.teacher, pair_logits=pair_logits, epoch=epoch, step=step, progress=progress,
                       seed=self.seed, spec=self.spec)

    def take_features(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        t = self.t_capture.take() if self.t_capture is not None else {}
        return self.s_capture.take(), t

    def close(self) -> None:
        """Remove every hook this runner registered."""
        self.s_capture.close()
        if self.t_capture is not None:
            self.t_capture.close()


def _same_batch(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and (a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b)))
