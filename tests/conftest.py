"""Shared fixtures: the shipped teacher and a small random BN network for closed-form tests."""

from __future__ import annotations

import pytest
import torch

from zeroshot_kd import load_teacher
from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.models import cifar_resnet
from zeroshot_kd.teachers import Teacher, state_sha256


@pytest.fixture(autouse=True)
def probe_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty BN-probe disk cache of its own (never the user's ``~/.cache/zkd``)."""
    path = tmp_path_factory.mktemp("zkd-cache")
    monkeypatch.setenv("ZKD_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def teacher():
    """The shipped Fashion-MNIST teacher (assets/fmnist_resnet14.pt), frozen, on CPU."""
    return load_teacher()


@pytest.fixture()
def small_net() -> torch.nn.Module:
    """A random ResNet-8 (width 4) in eval mode with non-trivial running statistics."""
    torch.manual_seed(0)
    net = cifar_resnet(8, 4)
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


@pytest.fixture()
def small_teacher(small_net) -> Teacher:
    """``small_net`` frozen as a Teacher with the Fashion-MNIST input spec (quantization and export tests)."""
    small_net.requires_grad_(False)
    return Teacher(small_net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(small_net))


@pytest.fixture()
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spy_rand(monkeypatch) -> list:
    """Patch torch.rand and torch.randint (QDrop's masks draw bytes with randint) for the rest of the test; returns
    the (device asked for, generator's device) of every call."""
    calls = []

    def wrap(fn):
        def spy(*args, generator=None, device=None, **kw):
            calls.append((None if device is None else torch.device(device), None if generator is None else
                          generator.device))
            return fn(*args, generator=generator, device=device, **kw)
        return spy

    monkeypatch.setattr(torch, "rand", wrap(torch.rand))
    monkeypatch.setattr(torch, "randint", wrap(torch.randint))
    return calls
