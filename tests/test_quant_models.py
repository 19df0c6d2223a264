"""BN folding, model conversion (CIFAR ResNet, torchvision ResNet-18/50, MobileNetV2), unsupported modules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.quant.calibrate import calibrate_activations, calibrate_weights
from zeroshot_kd.quant.fold import find_conv_bn_pairs, fold_bn
from zeroshot_kd.quant.modules import QuantConfig, QuantConv2d, QuantLinear, parse_keep_8bit, quant_layers, \
    quantize_model
from zeroshot_kd.quant.recon import find_blocks


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_fold_pair_closed_form():
    conv = nn.Conv2d(2, 3, 1, bias=True)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(3)))[0]
    model = nn.Sequential(conv, bn).eval()
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    fold_bn(model)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(model[0].weight, w0 * factor.view(-1, 1, 1, 1))
    torch.testing.assert_close(model[0].bias, (b0 - bn.running_mean) * factor + bn.bias)
    assert isinstance(model[1], nn.Identity)


@pytest.mark.parametrize("build, shape", [
    (lambda: __import__("zeroshot_kd.models", fromlist=["x"]).cifar_resnet(8, 4), (2, 1, 28, 28)),
    (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
])
def test_fold_keeps_outputs(build, shape):
    torch.manual_seed(0)
    model = randomize_bn(build())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        folded = copy.deepcopy(model)
        pairs = fold_bn(folded)
        out = folded(x)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fold_skips_bn_without_preceding_conv():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    pairs, how = find_conv_bn_pairs(model)
    assert pairs == [] and how == "fx"


@pytest.mark.parametrize("name, n_first_last", [("resnet18", ("conv1", "fc")), ("resnet50", ("conv1", "fc")),
                                                ("mobilenet_v2", ("features.0.0", "classifier.1"))])
def test_torchvision_models_convert(name, n_first_last):
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    depthwise = sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    fold_bn(model)
    layers = quantize_model(model, QuantConfig(4, 4))
    q = quant_layers(model)
    assert len(q) == len(layers) == n_layers
    assert sum(isinstance(m, QuantConv2d) and m.groups > 1 for _, m in q) == depthwise
    first, last = n_first_last
    assert layers[first].role == "first" and layers[first].w_bits == 8 and layers[first].a_bits is None
    assert layers[last].role == "last" and layers[last].w_bits == 8 and layers[last].a_bits == 8
    assert all(lc.w_bits == 4 and lc.a_bits == 4 for n, lc in layers.items() if n not in n_first_last)
    if name == "mobilenet_v2":
        blocks = find_blocks(model)
        assert blocks[0] == "features.0" and blocks[-1] == "classifier.1" and "features.1" in blocks


def test_quantized_mobilenet_runs_and_tracks_float():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    student = copy.deepcopy(model)
    fold_bn(student)
    quantize_model(student, QuantConfig(8, 8))
    calibrate_weights(student)
    calibrate_activations(student, [x], 1, torch.device("cpu"), progress=False)
    with torch.no_grad():
        ref, out = model(x), student(x)
    err = (out - ref).norm() / ref.norm()
    assert err < 0.1, err  # 8-bit: close to float, including depthwise layers


def test_keep_8bit_none_quantizes_input_and_everything():
    model = __import__("zeroshot_kd.models", fromlist=["x"]).cifar_resnet(8, 4).eval()
    layers = quantize_model(model, QuantConfig(3, 3, keep_8bit="none"))
    assert all(lc.w_bits == 3 and lc.a_bits == 3 for lc in layers.values())
    assert isinstance(model.conv1, QuantConv2d) and model.conv1.aq is not None
    assert isinstance(model.fc, QuantLinear)


def test_bits_and_keep_8bit_validation():
    with pytest.raises(ZkdError, match="2..8"):
        QuantConfig(9, 4)
    with pytest.raises(ZkdError, match="2..8"):
        QuantConfig(4, 1)
    with pytest.raises(ZkdError, match="keep-8bit"):
        parse_keep_8bit("first,middle")
    assert parse_keep_8bit("last, first") == ("first", "last") and parse_keep_8bit("none") == ()


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x).mean((2, 3))))


def test_unsupported_module_is_named():
    with pytest.raises(ZkdError, match=r"'norm' \(LayerNorm\) is not supported"):
        quantize_model(WithAttention(), QuantConfig())
    with pytest.raises(ZkdError, match=r"'0' \(Conv1d\)"):
        quantize_model(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), QuantConfig())


def test_layer_report_sqnr_against_direct_computation_with_in_place_activations():
    """Output SQNR compares each layer's own output, even where an in-place ReLU consumes it right after."""
    from zeroshot_kd.quant.report import layer_report

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 3, 1), nn.ReLU(inplace=True),
                       nn.Flatten(), nn.Linear(3 * 6 * 6, 5)).eval()
    student = copy.deepcopy(fp)
    quantize_model(student, QuantConfig(3, 3, keep_8bit=()))
    x = torch.randn(8, 1, 8, 8)
    calibrate_weights(student, "minmax")
    calibrate_activations(student, [x], 1, torch.device("cpu"), method="minmax", progress=False)
    rows = {r["layer"]: r for r in layer_report(student, fp, [x[:4], x[4:]], torch.device("cpu"))}
    with torch.no_grad():
        y_s0, y_f0 = student[0](x), fp[0](x)                   # pre-ReLU outputs, computed without in-place ops
        assert y_f0.min() < 0
        y_s2, y_f2 = student[2](y_s0.relu()), fp[2](y_f0.relu())
        a_in = y_s0.relu()
        a_hat = student[2].aq(a_in)
    db = lambda ref, err: 10 * math.log10(ref.pow(2).sum().item() / err.pow(2).sum().item())  # noqa: E731
    assert rows["0"]["out_sqnr_db"] == pytest.approx(db(y_f0, y_f0 - y_s0), rel=1e-5)
    assert rows["2"]["out_sqnr_db"] == pytest.approx(db(y_f2, y_f2 - y_s2), rel=1e-5)
    assert rows["2"]["a_sqnr_db"] == pytest.approx(db(a_in, a_in - a_hat), rel=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in list(student.modules()) + list(fp.modules()))
