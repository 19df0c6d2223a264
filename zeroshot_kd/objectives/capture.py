"""Intermediate features by module path for the objectives, captured with :class:`zeroshot_kd.capture.Capture`
(hooks only: the models are never modified).

An **address** is a module path as in ``model.named_modules()`` (``layer3``, ``layer3.1.relu2``), optionally
suffixed ``@in`` to take the module's first input instead of its output (``fc@in`` is the pooled penultimate
vector, ``layer3.1.relu2@in`` the last block's pre-ReLU sum). Inputs are read in a forward pre-hook and cloned, so
an in-place ReLU (torchvision's ``ReLU(inplace=True)``) cannot overwrite them; outputs are cloned too. A module
called several times in one forward (torchvision's ``BasicBlock.relu``) keeps its **last** call.

Keywords expand against a model's structure, so defaults work for CIFAR ResNets and torchvision ResNets alike:

============== ==================================================================================
``stages``       the outputs of the top-level children named ``layer1``, ``layer2``, ... (post-ReLU)
``last-stage``   the last of those
``stem``         the input of ``layer1`` (the stem's output)
``penultimate``  the input of the last ``nn.Linear`` (the pooled feature vector)
``preact``       for each stage, the input of the last ReLU of its last block (pre-ReLU, for OFD)
============== ==================================================================================
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from ..capture import Capture, split_address
from ..errors import ZkdError

__all__ = ["FeatureCapture", "KEYWORDS", "preact_bn", "resolve_layers", "split_address"]

KEYWORDS = ("stages", "last-stage", "stem", "penultimate", "preact")


def _stages(model: nn.Module, role: str) -> list[str]:
    found = [(int(m.group(1)), n) for n, _ in model.named_children() if (m := re.fullmatch(r"layer(\d+)", n))]
    if not found:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise ZkdError(f"the {role} has no top-level layer1, layer2, ... stages for the 'stages' keyword; pass "
                       f"module paths instead (its top-level modules: {children})")
    return [n for _, n in sorted(found)]


def _last_block(model: nn.Module, stage: str) -> tuple[str, nn.Module]:
    mod = model.get_submodule(stage)
    children = list(mod.named_children())
    if isinstance(mod, nn.Sequential) and children:
        name, block = children[-1]
        return f"{stage}.{name}", block
    return stage, mod


def _preact(model: nn.Module, stage: str, role: str) -> str:
    path, block = _last_block(model, stage)
    relus = [n for n, m in block.named_modules() if isinstance(m, nn.ReLU) and n]
    if not relus:
        raise ZkdError(f"the {role}'s {path} has no nn.ReLU module, so 'preact' cannot find its pre-ReLU output "
                       "(functional ReLU); pass layers=PATH@in explicitly")
    return f"{path}.{relus[-1]}@in"


def preact_bn(model: nn.Module, address: str) -> str | None:
    """The BatchNorm that feeds a ``preact`` address: the last BN of the block outside its shortcut, or None."""
    path, is_in = split_address(address)
    if not is_in or "." not in path:
        return None
    block_path = path.rsplit(".", 1)[0]
    try:
        block = model.get_submodule(block_path)
    except AttributeError:
        return None
    bns = [n for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)
           and not any(s in n for s in ("downsample", "shortcut"))]
    return f"{block_path}.{bns[-1]}" if bns else None


def _valid_paths(model: nn.Module, limit: int = 40) -> str:
    names = [n for n, _ in model.named_modules() if n]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve_layers(model: nn.Module, tokens: list[str], role: str = "student") -> list[str]:
    """Expand keywords and check that every address names an existing module of ``model``.

    Raises:
        ZkdError: a path that does not exist, listing the model's valid paths.
    """
    out: list[str] = []
    for tok in tokens:
        if tok == "stages":
            out += _stages(model, role)
        elif tok == "last-stage":
            out.append(_stages(model, role)[-1])
        elif tok == "stem":
            out.append(f"{_stages(model, role)[0]}@in")
        elif tok == "penultimate":
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ZkdError(f"the {role} has no nn.Linear layer for 'penultimate'; pass layers=PATH@in")
            out.append(f"{linears[-1]}@in")
        elif tok == "preact":
            out += [_preact(model, s, role) for s in _stages(model, role)]
        else:
            path, _ = split_address(tok)
            try:
                model.get_submodule(path)
            except AttributeError:
                raise ZkdError(f"layer {tok!r} does not exist in the {role}; use a module path (suffix @in for "
                               f"its input) or a keyword ({', '.join(KEYWORDS)}); valid paths: "
                               f"{_valid_paths(model)}") from None
            if not path:
                raise ZkdError(f"layer {tok!r}: give a sub-module path, not the whole {role}")
            out.append(tok)
    return out


class FeatureCapture(Capture):
    """The features at a list of addresses, recorded into ``self.features`` on every forward until :meth:`close`.

    A :class:`~zeroshot_kd.capture.Capture` opened at construction (stored tensors cloned, with their graph).
    Also records the root model's last input (``last_input``, not a copy), so a caller can tell whether the
    captured features belong to the batch at hand.
    """

    def __init__(self, model: nn.Module, addresses: list[str]) -> None:
        super().__init__(model, addresses)
        self._root = Capture(model, ["@in"], clone=False) if addresses else None
        self.open()
        if self._root is not None:
            self._root.open()

    @property
    def last_input(self) -> torch.Tensor | None:
        return self._root.features.get("@in") if self._root is not None else None

    def clear(self) -> None:
        super().clear()
        if self._root is not None:
            self._root.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with super().paused(), (self._root.paused() if self._root is not None else contextlib.nullcontext()):
            yield

    def close(self) -> None:
        super().close()
        if self._root is not None:
            self._root.close()
