"""One way to read a model's intermediate tensors: hooks on named modules, with one lifecycle and one dtype rule.

Every part of zkd that looks inside a forward pass (BN statistics' hook path, dataset similarity, activation
calibration, block reconstruction, quantization reports, feature objectives) goes through :class:`Capture`.

**Sites.** A site is an address: a module path as in ``model.named_modules()`` (``layer3``) for the module's
output, or the path suffixed ``@in`` (``layer3.1.relu@in``) for its first positional input; ``""`` / ``"@in"`` is
the model itself.

**When.** Inputs are read in a forward *pre*-hook, before the module runs, so an in-place operation inside it
(torchvision's ``ReLU(inplace=True)`` overwrites its own input) cannot have changed them; outputs in a forward
hook, right after the module returns. A module called several times per forward (torchvision's
``BasicBlock.relu``) is recorded at every call: a stored site keeps the **last** call, a reduction sees every call,
and :attr:`Capture.calls` counts them.

**Stored or reduced.** Without ``reduce`` the tensors are stored in :attr:`Capture.features`, **cloned** by
default: a later in-place operation of the same forward (the next in-place ReLU, ``out += identity``) would
otherwise overwrite what was stored. The clone is differentiable, so stored features keep their autograd graph
unless ``detach=True``. With ``reduce=fn`` nothing is stored: ``fn(address, tensor)`` is called inside the hook
with the live tensor (no copy), for streaming statistics; it must not modify the tensor.

**dtype rule.** Captured tensors keep the dtype the forward produced them in (bfloat16 under bf16 autocast stays
bfloat16): nothing is cast here. Whatever computes statistics from them (a ``reduce`` callback, a loss) does so in
float32 at least, as every caller in zkd does (BN statistics float32, similarity float64, calibration float32).

**Lifecycle.** Hooks are registered by ``with Capture(...)`` or :meth:`Capture.open` and removed by the context's
exit or :meth:`Capture.close`, also when the forward (or the registration itself) raises. :meth:`Capture.paused`
suspends recording without removing the hooks; :meth:`Capture.clear` forgets what was recorded.

**Stopping early.** With ``stop_after=ADDRESS`` the forward is aborted as soon as that site has been recorded (a
private exception raised in the hook); run the model through :meth:`Capture.run`, which swallows it and returns
None. Used by reconstruction, which needs one block's input and output, not the rest of the network.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import ZkdError

__all__ = ["Capture", "CaptureError", "split_address"]

Reduce = Callable[[str, torch.Tensor], None]


class CaptureError(ZkdError):
    """A captured site does not give what was asked (not a tensor, or not a single-input module)."""


class _Stop(Exception):
    """Raised inside a hook to abort the rest of the forward (``stop_after``); caught by :meth:`Capture.run`."""


def split_address(address: str) -> tuple[str, bool]:
    """``"fc@in"`` -> ("fc", True); ``"layer3"`` -> ("layer3", False)."""
    if address.endswith("@in"):
        return address[: -len("@in")], True
    return address, False


class Capture:
    """Context manager that records (or reduces) the inputs and/or outputs of named modules during forwards.

    Example::

        with Capture(model, ["layer1.1.relu@in", "layer4"]) as cap:
            model(x)
        pre_activation, stage4 = cap.features["layer1.1.relu@in"], cap.features["layer4"]

    Args:
        model: the model; nothing in it is modified (only hooks are added, and removed on exit).
        addresses: sites to capture (``path`` for the output, ``path@in`` for the first input).
        clone: store copies (default). Only for stored tensors; reductions always see the live tensor.
        detach: store / pass detached tensors (no autograd graph).
        reduce: ``fn(address, tensor)`` called at each capture instead of storing.
        stop_after: abort the forward once this address (one of ``addresses``) has been recorded.
        single_input: require every captured module to be called with exactly one positional tensor and no
            keyword arguments (reconstruction re-runs blocks as ``block(x)``); otherwise :class:`CaptureError`.

    Raises:
        ZkdError: an address that names no module of ``model``, or ``stop_after`` not among ``addresses``.
    """

    def __init__(self, model: nn.Module, addresses: Sequence[str], *, clone: bool = True, detach: bool = False,
                 reduce: Reduce | None = None, stop_after: str | None = None, single_input: bool = False) -> None:
        self.model = model
        self.addresses = list(dict.fromkeys(addresses))
        self.clone, self.detach, self.reduce = clone, detach, reduce
        self.stop_after, self.single_input = stop_after, single_input
        if stop_after is not None and stop_after not in self.addresses:
            raise ZkdError(f"stop_after={stop_after!r} is not one of the captured addresses {self.addresses}")
        self._modules: dict[str, nn.Module] = {}
        for addr in self.addresses:
            path, _ = split_address(addr)
            try:
                self._modules[addr] = model.get_submodule(path)
            except AttributeError:
                raise ZkdError(f"cannot capture {addr!r}: the model has no module {path!r}") from None
        self.features: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {a: 0 for a in self.addresses}
        self.enabled = True
        self._handles: list[Any] = []

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether hooks are registered (between open and close) and there is something to capture."""
        return bool(self._handles)

    def open(self) -> "Capture":
        """Register the hooks (idempotent). On a failure half-way, the hooks already registered are removed."""
        if self._handles:
            return self
        try:
            for addr, module in self._modules.items():
                _, is_in = split_address(addr)
                if is_in:
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(addr), with_kwargs=True))
                else:
                    self._handles.append(module.register_forward_hook(self._post_hook(addr), with_kwargs=True))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every hook (idempotent); what was recorded stays readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Capture":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Suspend recording for the duration of the block (the hooks stay registered)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def clear(self) -> None:
        """Forget the stored tensors (the call counts keep counting)."""
        self.features = {}

    def take(self) -> dict[str, torch.Tensor]:
        """Return the stored tensors and forget them (each batch starts empty)."""
        out, self.features = self.features, {}
        return out

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)``; returns None instead when the forward was stopped at ``stop_after``."""
        try:
            return self.model(*args, **kwargs)
        except _Stop:
            return None

    # -- hooks ------------------------------------------------------------------------------------------------
    def _check_call(self, addr: str, args: tuple, kwargs: dict) -> None:
        if self.single_input and (len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor)):
            raise CaptureError(f"module {split_address(addr)[0]!r} is not called with one tensor argument")

    def _record(self, addr: str, value: Any, what: str) -> None:
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"layer {addr!r} {what} is not a tensor; pick another layer")
        self.calls[addr] += 1
        if self.detach:
            value = value.detach()
        if self.reduce is not None:
            self.reduce(addr, value)
        else:
            self.features[addr] = value.clone() if self.clone else value
        if addr == self.stop_after:
            raise _Stop(addr)

    def _pre_hook(self, addr: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.enabled:
                self._check_call(addr, args, kwargs)
                self._record(addr, args[0] if args else None, "input")

        return hook

    def _post_hook(self, addr: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.enabled:
                self._check_call(addr, args, kwargs)
                self._record(addr, output, "output")

        return hook
