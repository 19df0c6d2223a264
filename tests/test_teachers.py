"""Teacher resolution: files (wrapped checkpoints), module:function, torchvision names, built-ins, errors."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torchvision

from zeroshot_kd import load_teacher
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.models import cifar_resnet
from zeroshot_kd.teachers import DEFAULT_TEACHER, builtin_teachers, state_sha256


@pytest.fixture()
def tinymod(tmp_path, monkeypatch):
    """An importable module ``tinymod`` with ``build(num_classes=10)`` returning a small CIFAR ResNet."""
    (tmp_path / "tinymod.py").write_text(textwrap.dedent("""
        import torch
        from zeroshot_kd.models import cifar_resnet

        def build(num_classes=10):
            torch.manual_seed(0)
            return cifar_resnet(8, 4, in_channels=1, num_classes=num_classes)

        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import tinymod

    return tinymod


def test_builtin_default_teacher(teacher):
    assert DEFAULT_TEACHER in builtin_teachers()
    assert teacher.source["kind"] == "builtin" and teacher.spec.shape == (1, 28, 28)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())


@pytest.mark.parametrize("name, floor", [("fmnist_resnet14", 92.0), ("fmnist_mobilenetv2", 89.0)])
def test_shipped_teachers_accuracy_on_real_test_set(name, floor):
    from zeroshot_kd.data import make_dataset

    teacher = load_teacher(name)
    ds = make_dataset("fashion-mnist:test", teacher.spec)
    x, y = ds.tensors
    with torch.no_grad():
        pred = torch.cat([teacher.model(x[i : i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    acc = 100 * (pred == y).float().mean().item()
    assert acc >= floor
    assert acc == pytest.approx(teacher.source["test_accuracy"], abs=0.05)  # the card tells the truth


def test_shipped_mobilenet_has_depthwise_convolutions():
    teacher = load_teacher("fmnist_mobilenetv2")
    convs = [m for m in teacher.model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [m for m in convs if m.groups == m.in_channels == m.out_channels > 1]
    assert len(depthwise) == 8  # one per inverted-residual block of SMALL_MOBILENET_V2 (1 + 2 + 2 + 2 + 1)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.model.modules()) == len(convs)


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "module_prefix"])
def test_checkpoint_file_wrappers(tmp_path, tinymod, wrap):
    net = tinymod.build()
    torch.nn.init.normal_(net.fc.weight)  # differ from a fresh build
    sd = net.state_dict()
    obj = {"bare": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    t = load_teacher(str(path), arch="tinymod:build", image_size=28, mean=[0.5], std=[0.25])
    assert state_sha256(t.model) == state_sha256(net)
    assert t.source["kind"] == "file" and len(t.source["sha256"]) == 64
    assert t.spec.channels == 1 and t.spec.mean == (0.5,) and t.spec.std == (0.25,) and t.spec.image_size == 28
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(t.model(x), net.eval()(x))


def test_module_function_with_weights(tmp_path, tinymod):
    net = tinymod.build()
    torch.nn.init.normal_(net.fc.weight)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    t = load_teacher("tinymod:build", weights=str(tmp_path / "w.pt"), num_classes=10, image_size=28)
    assert state_sha256(t.model) == state_sha256(net)
    assert t.spec.channels == 1  # taken from the first conv


def test_torchvision_name_without_weights_and_with_state_dict(tmp_path):
    t = load_teacher("resnet18", weights="none", num_classes=7)
    assert isinstance(t.model, torchvision.models.ResNet) and t.spec.num_classes == 7
    assert t.spec.shape == (3, 224, 224)
    torch.save({"state_dict": t.model.state_dict()}, tmp_path / "r18.pth")
    t2 = load_teacher("resnet18", weights=str(tmp_path / "r18.pth"), num_classes=7)
    assert state_sha256(t2.model) == state_sha256(t.model)


def test_torchvision_enum_takes_spec_from_transforms(monkeypatch):
    """The input spec and the recorded enum come from the weights entry (download faked: no network here)."""
    real = torchvision.models.get_model

    def fake_get_model(name, weights=None, **kw):
        return real(name, weights=None, **kw)

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    t = load_teacher("resnet50", weights="IMAGENET1K_V2")
    assert t.source["weights"] == "ResNet50_Weights.IMAGENET1K_V2"
    assert t.spec.image_size == 224 and t.spec.mean == (0.485, 0.456, 0.406) and t.spec.num_classes == 1000
    t = load_teacher("resnet50", weights="DEFAULT")
    assert t.source["weights"] == "ResNet50_Weights.IMAGENET1K_V2"  # DEFAULT resolved to the exact enum


def test_offline_download_names_the_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(ZkdError) as e:
        load_teacher("resnet18", weights="DEFAULT")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "--weights PATH" in msg


@pytest.mark.parametrize("spec, kwargs, pattern", [
    ("no_such_model_xyz", {}, "unknown teacher"),
    ("missing/file.pt", {}, "neither an existing file"),
    ("os.path:nope", {}, "has no attribute"),
    ("no_such_module_q:build", {}, "cannot import"),
    ("tinymod:not_a_model", {}, "not a torch.nn.Module"),
    ("resnet18", {"weights": "IMAGENET9K"}, "unknown --weights"),
    ("tinymod:build", {"weights": "/nonexistent.pt"}, "does not exist"),
])
def test_bad_teacher_specs(tinymod, spec, kwargs, pattern):
    with pytest.raises(ZkdError, match=pattern):
        load_teacher(spec, **kwargs)


def test_checkpoint_errors(tmp_path, tinymod):
    net = tinymod.build()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ZkdError, match="--arch"):
        load_teacher(str(tmp_path / "w.pt"))
    with pytest.raises(ZkdError, match="do not fit"):
        load_teacher(str(tmp_path / "w.pt"), arch="resnet18")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ZkdError, match="cannot read checkpoint"):
        load_teacher(str(tmp_path / "junk.pt"), arch="tinymod:build")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ZkdError, match="no state_dict"):
        load_teacher(str(tmp_path / "list.pt"), arch="tinymod:build")
    with pytest.raises(ZkdError, match="bad input spec"):
        load_teacher("tinymod:build", channels=3, mean=[0.5, 0.5])
