"""Defects fixed with the one model record (issue 9): distill cards of --student-arch, resize-then-crop, builders'
own TypeErrors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from zeroshot_kd import InputSpec, Teacher, ZkdError, load_teacher
from zeroshot_kd.data import FASHION_MNIST_SPEC, make_dataset
from zeroshot_kd.distill import build_student
from zeroshot_kd.modelspec import ModelRecord, build_model, register_builder


def test_student_arch_card_rebuilds_through_load_teacher(tmp_path):
    """`--student ckpt.pt --student-arch resnet18` used to write {"builder": "resnet18"}, which load_teacher refused."""
    import torchvision

    src = torchvision.models.resnet18(num_classes=10)
    ckpt = tmp_path / "r18.pt"
    torch.save(src.state_dict(), ckpt)
    teacher = Teacher(torch.nn.Identity(), InputSpec(3, 32, (0.5,) * 3, (0.5,) * 3, 10))
    model, card = build_student(str(ckpt), teacher, arch="resnet18")
    out = tmp_path / "student.pt"
    torch.save(model.state_dict(), out)
    (tmp_path / "student.json").write_text(json.dumps({"architecture": card, "input_spec": teacher.spec.to_dict()}))
    again = load_teacher(str(out))
    x = torch.randn(2, 3, 32, 32)
    src.eval()
    assert torch.equal(again.model(x), src(x))


def test_folder_data_resizes_then_crops_like_torchvision(tmp_path):
    from torchvision import transforms

    (tmp_path / "c0").mkdir()
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(300, 400, 3, generator=g) * 255).to(torch.uint8).numpy())
    img.save(tmp_path / "c0" / "a.png")
    spec = InputSpec(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1, resize_size=256)
    x, _ = make_dataset(f"folder:{tmp_path}", spec)[0]
    ref = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                              transforms.Normalize(spec.mean, spec.std)])(Image.open(tmp_path / "c0" / "a.png"))
    assert torch.equal(x, ref)
    assert InputSpec.from_dict(spec.to_dict()).resize_size == 256
    assert "resize_size" not in FASHION_MNIST_SPEC.to_dict()          # old records keep their layout


def test_a_typeerror_inside_the_builder_is_not_swallowed():
    calls = []

    def broken(num_classes: int = 10) -> torch.nn.Module:
        calls.append(num_classes)
        raise TypeError("bug inside the builder")

    register_builder("test-broken-builder", broken)
    with pytest.raises(TypeError, match="bug inside the builder"):
        build_model(ModelRecord("test-broken-builder", {"num_classes": 3}))
    assert calls == [3]                                               # called once, with num_classes, no bare retry
