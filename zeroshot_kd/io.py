"""Atomic file output: everything zkd writes goes to a temporary name first and is renamed when complete."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ZkdError
from .version import __version__

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_torch_save", "load_versioned"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success, delete it on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_torch_load(path: str | os.PathLike, unreadable: str, missing: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with one-line errors: the one safe reader of torch files.

    Args:
        path: the file.
        unreadable: the message when torch cannot read it (no pickled code is ever run); ``{path}`` and ``{error}``
            (the exception's type name) are filled in.
        missing: the message when the file does not exist (``{path}`` filled in); None: ``unreadable``.

    Raises:
        ZkdError: the file is missing or not a safe torch file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        msg = missing if missing is not None else unreadable
        raise ZkdError(msg.format(path=path, error=type(e).__name__)) from None
    except Exception as e:  # torch raises many types for non-torch / pickled-code payloads
        raise ZkdError(unreadable.format(path=path, error=type(e).__name__)) from None


def load_versioned(path: str | os.PathLike, fmt: str, versions: tuple[int, ...], what: str,
                   fix: str) -> dict[str, Any] | None:
    """Read a versioned zkd torch file safely (``weights_only=True``): the one reader of ``format``/``format_version``.

    Args:
        path: the file (must exist; callers word their own "does not exist" message).
        fmt: the expected ``format`` field.
        versions: the ``format_version`` values this zkd reads.
        what: the kind of file for messages, e.g. ``"student"``.
        fix: what the user should do about an unsupported version, e.g. ``"re-run 'zkd calibrate'"``.

    Returns:
        The file's dict, or None when it is a readable torch file of another kind (no matching ``format``).

    Raises:
        ZkdError: the file cannot be read as a safe torch file, or its version is not one of ``versions``.
    """
    obj = safe_torch_load(path, "cannot read {path} ({error}); it is not a zkd " + what + " or torch file")
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        return None
    if obj.get("format_version") not in versions:
        raise ZkdError(f"{path}: unknown {what} format version {obj.get('format_version')!r}; this zkd {__version__} "
                       f"reads version {', '.join(map(str, versions))} -- {fix} or upgrade zkd")
    return obj
