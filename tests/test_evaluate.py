"""``zeroshot_kd.evaluate``: top-1 / top-5 over labelled items, agreement and KL against a teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.evaluate import evaluate_model, topk_correct


class Scaled(nn.Module):
    """Logits = the input row times a constant (so logits are known in advance)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


def test_topk_correct_small_case():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.9]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, 1) == 1
    assert topk_correct(logits, labels, 2) == 2  # row 1: label 2 is second; row 2: label 0 is last
    assert topk_correct(logits, labels, 5) == 3  # k capped at 3 classes


def test_evaluate_model_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 10, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    y[:7] = -1  # unlabelled items are excluded from top-k
    teacher = nn.Sequential(nn.Linear(10, 10))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.eye(10) + 0.3 * torch.randn(10, 10, generator=g))
        teacher[0].bias.zero_()
    res = evaluate_model(Scaled(2.0), TensorDataset(x, y), batch_size=16, teacher=teacher, progress=False)
    s = 2.0 * x
    with torch.no_grad():
        t = teacher(x)
    lab = y >= 0
    assert res["images"] == 50 and res["labelled"] == 43
    assert res["top1"] == pytest.approx(100.0 * (s[lab].argmax(1) == y[lab]).float().mean().item())
    top5 = sum(int(y[i]) in s[i].topk(5).indices.tolist() for i in range(50) if y[i] >= 0)
    assert res["top5"] == pytest.approx(100.0 * top5 / 43)
    assert res["agreement"] == pytest.approx(100.0 * (s.argmax(1) == t.argmax(1)).float().mean().item())
    pt, ps = torch.softmax(t, 1), torch.softmax(s, 1)
    assert res["kl"] == pytest.approx((pt * (pt.log() - ps.log())).sum(1).mean().item(), rel=1e-4)


def test_no_labels_and_no_teacher():
    x = torch.randn(8, 4)
    res = evaluate_model(Scaled(1.0), TensorDataset(x, torch.full((8,), -1)), progress=False)
    assert res["top1"] is None and res["top5"] is None and res["agreement"] is None and res["images"] == 8


def test_teacher_with_other_classes_is_refused():
    x = torch.randn(4, 4)
    with pytest.raises(ZkdError, match="same classes"):
        evaluate_model(Scaled(1.0), TensorDataset(x, torch.zeros(4, dtype=torch.long)), teacher=nn.Linear(4, 3),
                       progress=False)
