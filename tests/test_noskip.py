"""No-skip students (``noskip:ARCH``): the residual network with every shortcut removed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from zeroshot_kd import Teacher
from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.distill import build_student
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.models import cifar_resnet, noskip

pytestmark = pytest.mark.usefixtures("one_thread")


class _TimesZero(nn.Module):
    """A shortcut multiplied by 0: the residual block's own forward then adds nothing to its branch."""

    def __init__(self, inner: nn.Module | None) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.inner is None else self.inner(x)) * 0


def _zero_shortcuts(model: nn.Module) -> int:
    """Wrap every block's shortcut (identity or projection) in :class:`_TimesZero`, keeping the original forwards."""
    import torchvision.models.resnet as tv

    from zeroshot_kd.models import BasicBlock

    blocks = [m for m in model.modules() if type(m) in (BasicBlock, tv.BasicBlock, tv.Bottleneck)]
    for b in blocks:
        b.downsample = _TimesZero(b.downsample)
    return len(blocks)


def _check_equivalent(residual: nn.Module, plain: nn.Module, x: torch.Tensor) -> None:
    """Load the no-skip weights into the residual net, zero its shortcuts, and compare outputs and BN updates."""
    missing, unexpected = residual.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".downsample." in k for k in missing)      # only the projections are absent
    projection = {k for k in residual.state_dict() if ".downsample." in k}
    assert set(plain.state_dict()) == set(residual.state_dict()) - projection
    with torch.no_grad():
        residual.eval()                                               # (eval: leave its running statistics as loaded)
        before = residual(x)                                          # the real residual network: differs
        blocks = _zero_shortcuts(residual)
        assert blocks > 0
        for mode in (True, False):                                    # batch statistics, then running statistics
            residual.train(mode), plain.train(mode)
            ref, out = residual(x), plain(x)
            assert torch.equal(out, ref)
        assert not torch.allclose(before, out)
    state_ref = {k: v for k, v in residual.state_dict().items() if ".downsample." not in k}
    for k, v in plain.state_dict().items():                           # BN running statistics updated identically
        assert torch.equal(v, state_ref[k]), k


def test_noskip_cifar_resnet_equals_residual_net_with_zeroed_shortcuts():
    t = Teacher(cifar_resnet(8, 4), FASHION_MNIST_SPEC)
    plain, card = build_student("noskip:cifar-resnet:14x4", t, seed=2)
    assert card == {"builder": "zeroshot_kd.models:noskip", "first_layer": "conv1", "last_layer": "fc",
                    "kwargs": {"arch": "cifar-resnet:14x4", "num_classes": 10, "in_channels": 1}}
    assert plain.training and all(p.requires_grad for p in plain.parameters())
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    _check_equivalent(cifar_resnet(14, 4), plain, x)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_noskip_torchvision_resnets_equal_residual_nets_with_zeroed_shortcuts(arch):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = noskip(arch, num_classes=7)
        # BN affine parameters away from their (1, 0) init, so the test sees every layer's effect
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.2), nn.init.normal_(m.bias, 0.0, 0.2)
    residual = torchvision.models.get_model(arch, weights=None, num_classes=7)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _check_equivalent(residual, plain, x)


def test_noskip_checkpoint_card_rebuilds_the_student(tmp_path):
    from zeroshot_kd import load_teacher

    t = Teacher(cifar_resnet(8, 4), FASHION_MNIST_SPEC)
    plain, card = build_student("noskip:cifar-resnet:8x2", t, seed=5)
    torch.save({"model": plain.state_dict()}, tmp_path / "s.pt")
    (tmp_path / "s.json").write_text(json.dumps({"architecture": card, "input_spec": FASHION_MNIST_SPEC.to_dict()}))
    back = load_teacher(str(tmp_path / "s.pt")).model
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plain.eval()
    with torch.no_grad():
        assert torch.equal(back(x), plain(x))
    again, _ = build_student("noskip:cifar-resnet:8x2", t, weights=str(tmp_path / "s.pt"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("spec, needle", [("noskip:vgg11", "no ResNet BasicBlock"),
                                          ("noskip:nonsense", "torchvision ResNet name"),
                                          ("noskip:cifar-resnet:9x2", "6n+2")])
def test_noskip_bad_specs_are_zkd_errors(spec, needle):
    t = Teacher(cifar_resnet(8, 4), FASHION_MNIST_SPEC)
    with pytest.raises(ZkdError, match="--student " + spec.replace("+", "\\+")) as e:
        build_student(spec, t)
    assert needle in str(e.value)
