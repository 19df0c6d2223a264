"""Running objectives on real models: feature hooks, the one-time dry run, and the calibrate ``loss_fn`` adapter."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ZkdError
from ..runtime import batch_seed
from .base import KDBatch, ObjectiveSet
from .capture import FeatureCapture

__all__ = ["LossFn", "ObjectiveRunner", "make_loss_fn"]


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


class LossFn:
    """``loss_fn(student_logits, teacher_logits, inputs, targets) -> (loss, terms)`` built from objective specs.

    Objectives that need the models (feature objectives, ``bss``, ``tfkd-self`` with its default copy) need
    :meth:`bind` first - at construction (:func:`make_loss_fn` with ``student``/``teacher``) or later, once the
    caller has built its student (as ``zkd calibrate`` does). Logit-only objectives work unbound.

    Feature objectives read the activations the hooks captured during the caller's own forwards. When the
    teacher's captured features do not belong to ``inputs`` (teacher logits were cached, say), the teacher is run
    again on ``inputs`` under ``no_grad``; likewise the student (with gradients). Trainable adapter parameters
    (OFD/FSP connectors) are in :meth:`parameters`: add them to the optimizer - or, when the caller's optimizer
    cannot take them, pass ``own_lr`` and the loss function steps its own Adam on them at the start of each call
    (with the gradients of the previous backward). Call :meth:`close` at the end.
    """

    def __init__(self, objectives: ObjectiveSet, spec: Any = None, seed: int = 0,
                 total_steps: int | None = None, own_lr: float | None = None) -> None:
        self.objectives, self.spec, self.seed, self.total_steps = objectives, spec, seed, total_steps
        self.own_lr = own_lr
        self._own_opt: torch.optim.Optimizer | None = None
        self.runner: ObjectiveRunner | None = None
        self.specs: list[str] = []          # the spec strings, for reports
        self.step = 0
        self.epoch = 0

    @property
    def needs_models(self) -> bool:
        """Whether :meth:`bind` must be called before the first call."""
        from .relation import FeatureObjective

        return any(isinstance(o, FeatureObjective) or o.name == "bss" or
                   (o.name == "tfkd-self" and o.params["teacher"] != "main") for o in self.objectives.items)

    def bind(self, student: nn.Module, teacher: nn.Module | None, example_inputs: torch.Tensor | None = None
             ) -> "LossFn":
        """Attach to the models: resolve layers, register hooks, and (given ``example_inputs``) build adapters."""
        if self.runner is not None:
            self.runner.close()
        device = next(student.parameters()).device
        self.objectives.to(device)
        self.runner = ObjectiveRunner(self.objectives, student, teacher, self.spec, self.seed)
        if example_inputs is not None and not self.runner.ready:
            self.runner.setup(example_inputs[:2].to(device))
        self.objectives.to(device)
        self._own_opt = None
        return self

    def _step_own(self) -> None:
        """With ``own_lr``: apply the previous backward's gradients to the objectives' own parameters (Adam)."""
        if self.own_lr is None or self.runner is None:
            return
        params = self.parameters()
        if not params:
            return
        if self._own_opt is None:
            self._own_opt = torch.optim.Adam(params, lr=self.own_lr)
        if any(p.grad is not None for p in params):
            self._own_opt.step()
            self._own_opt.zero_grad(set_to_none=True)

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters owned by the objectives (empty before :meth:`bind` for adapter objectives)."""
        return list(self.runner.extra_parameters()) if self.runner is not None else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, inputs: torch.Tensor,
                 targets: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        r = self.runner
        s_feats: dict[str, torch.Tensor] = {}
        t_feats: dict[str, torch.Tensor] = {}
        if r is None:
            if self.needs_models:
                raise ZkdError("objectives " + ", ".join(o.name for o in self.objectives.items)
                               + " need the models: call loss_fn.bind(student, teacher, example_inputs) first")
        else:
            if not r.ready:
                r.setup(inputs[:2])
            self._step_own()
            s_cap, t_cap = r.s_capture, r.t_capture
            if s_cap._handles and not _same_batch(s_cap.last_input, inputs):
                r.student(inputs)
            if t_cap is not None and t_cap._handles and not _same_batch(t_cap.last_input, inputs):
                with torch.no_grad():
                    r.teacher(inputs)
            s_feats, t_feats = r.take_features()
        progress = min(self.step / self.total_steps, 1.0) if self.total_steps else 0.0
        batch = KDBatch(student_logits=student_logits, teacher_logits=teacher_logits, inputs=inputs,
                        labels=targets, student_features=s_feats, teacher_features=t_feats,
                        student=r.student if r else None, teacher=r.teacher if r else None, epoch=self.epoch,
                        step=self.step, progress=progress, seed=self.seed, spec=self.spec)
        self.objectives.train(r.student.training if r else True)
        loss, terms = self.objectives(batch)
        self.step += 1
        if r is not None:
            r.s_capture.clear()
            if r.t_capture is not None:
                r.t_capture.clear()
        return loss, terms

    def close(self) -> None:
        """Remove the hooks (the loss function can be bound again afterwards)."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def make_loss_fn(specs: list[str] | str, student: nn.Module | None = None, teacher: nn.Module | None = None,
                 example_inputs: torch.Tensor | None = None, spec: Any = None, seed: int = 0,
                 total_steps: int | None = None, own_lr: float | None = None) -> LossFn:
    """Build a calibrate-style ``loss_fn`` from ``--objective`` specs (``["kd:T=4", "rkd:weight=1"]``).

    Args:
        specs: objective specs, parsed with :func:`zeroshot_kd.objectives.parse_spec`.
        student: the model being fine-tuned (forward hooks are registered on it); may be bound later with
            ``loss_fn.bind(student, teacher, example_inputs)``.
        teacher: the frozen teacher (hooks too).
        example_inputs: a batch (2 images suffice) for the dry run that sizes adapters. Give it when using
            ``ofd`` or ``fsp`` so the adapters exist before you build the optimizer (else: built on first call).
        spec: the teacher's InputSpec (valid input range for BSS attacks).
        seed: base seed for objectives that draw randomness.
        total_steps: number of fine-tuning steps (for progress-based schedules such as BSS's).
        own_lr: if set, the loss function trains its own parameters (connectors) with Adam at this rate, for
            callers whose optimizer only holds the student's parameters.

    Raises:
        ZkdError: an unknown objective or parameter, a layer path missing from a model, or an objective that needs
            the ``zkd distill`` loop (cskd's pair sampler, kdcl's peer networks).
    """
    from . import build

    objectives = build([specs] if isinstance(specs, str) else list(specs))
    loop_only = [o.name for o in objectives.items if o.needs_loop]
    if loop_only:
        raise ZkdError(f"objective(s) {', '.join(loop_only)} need the zkd distill training loop (pair sampler or "
                       "peer networks); in calibrate use: " + ", ".join(_calibrate_names()))
    fn = LossFn(objectives, spec, seed, total_steps, own_lr)
    fn.specs = [specs] if isinstance(specs, str) else [str(x) for x in specs]
    if student is not None:
        fn.bind(student, teacher, example_inputs)
    return fn


def _calibrate_names() -> list[str]:
    from . import REGISTRY

    return [n for n, cls in REGISTRY.items() if not cls.needs_loop]

