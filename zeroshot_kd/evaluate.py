"""Accuracy of a teacher or student on a data source: top-1 / top-5, and agreement / KL with a teacher.

Top-k counts only labelled items (label >= 0; ``gaussian:N`` has none). Agreement is the fraction of items where
the model's and the teacher's arg-max agree; KL is ``KL(p_teacher || p_model)`` at T = 1, averaged over items.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .errors import ZkdError
from .runtime import autocast

__all__ = ["evaluate_model", "topk_correct"]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Number of rows whose label is among the ``k`` largest logits (k capped at the number of classes)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels.view(-1, 1)).any(1).sum().item())


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 256,
                   teacher: nn.Module | None = None, precision: str = "fp32", progress: bool = True,
                   desc: str = "evaluate", return_logits: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy of ``model`` on ``dataset``, and agreement/KL with ``teacher`` if given.

    The one evaluator of zkd (``zkd evaluate``, ``zkd distill``'s records, ``zkd calibrate``'s report). Unit:
    **percent** for top-1, top-5 and agreement (as the CLI prints them); KL in nats per item. Both models run in
    eval mode; their modes are restored afterwards, so a training loop can evaluate between steps.

    Args:
        model: the model evaluated.
        dataset: map-style ``(normalized image, label or -1)``; only labelled items count for top-k.
        device, batch_size, precision: how to run the forwards (logits compared in float32).
        teacher: reference model for agreement and ``KL(p_teacher || p_model)`` at T = 1.
        progress, desc: tqdm bar.
        return_logits: also return the float32 CPU logits (``logits``, ``teacher_logits``) of every item.

    Returns:
        ``{"images", "labelled", "top1", "top5", "agreement", "kl"}``; accuracies are None without labels,
        agreement/KL None without a teacher.
    """
    device = torch.device(device)
    modes = [(m, m.training) for m in (model, teacher) if m is not None]
    for m, _ in modes:
        m.eval()
    n = labelled = c1 = c5 = agree = 0
    kl_sum = 0.0
    kept: list[torch.Tensor] = []
    kept_t: list[torch.Tensor] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    try:
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            with autocast(device, precision):
                logits = model(x).float()
            mask = y >= 0
            if mask.any():
                labelled += int(mask.sum())
                c1 += topk_correct(logits[mask], y[mask], 1)
                c5 += topk_correct(logits[mask], y[mask], 5)
            if teacher is not None:
                with autocast(device, precision):
                    t = teacher(x).float()
                if t.shape != logits.shape:
                    raise ZkdError(f"model gives {tuple(logits.shape[1:])} outputs, teacher {tuple(t.shape[1:])}; "
                                   "compare models with the same classes")
                agree += int((t.argmax(1) == logits.argmax(1)).sum())
                kl_sum += F.kl_div(F.log_softmax(logits, 1), F.log_softmax(t, 1), reduction="sum",
                                   log_target=True).item()
                if return_logits:
                    kept_t.append(t.cpu())
            if return_logits:
                kept.append(logits.cpu())
            n += x.shape[0]
    finally:
        for m, mode in modes:
            m.train(mode)
    out: dict[str, Any] = {
        "images": n,
        "labelled": labelled,
        "top1": 100.0 * c1 / labelled if labelled else None,
        "top5": 100.0 * c5 / labelled if labelled else None,
        "agreement": 100.0 * agree / n if teacher is not None and n else None,
        "kl": kl_sum / n if teacher is not None and n else None,
    }
    if return_logits:
        out["logits"] = torch.cat(kept) if kept else torch.zeros(0)
        out["teacher_logits"] = torch.cat(kept_t) if kept_t else None
    return out
