"""Low-bit pre-steps and choices: output-error activation ranges, cross-layer equalization, bias correction,
mixed-precision allocation under a size budget (values checked by closed forms and brute force)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.quant.calibrate import calibrate_weights, qparams_from_range
from zeroshot_kd.quant.equalize import ChannelClip, correct_bias, equalize, find_equalization_pairs
from zeroshot_kd.quant.fold import fold_bn
from zeroshot_kd.quant.mixed import allocate, choose_bits, parse_size_budget
from zeroshot_kd.quant.modules import QuantConfig, QuantLinear, quant_layers
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student
from zeroshot_kd.quant.ranges import search_act_output
from zeroshot_kd.quant.student import load_student, save_student
from zeroshot_kd.teachers import Teacher, state_sha256


def _bn(c: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 + 0.1)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> pointwise -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.c1, self.b1, self.a1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), _bn(6, g), nn.ReLU()
        self.c2, self.b2, self.a2 = nn.Conv2d(6, 8, 1, bias=False), _bn(8, g), nn.ReLU6()
        self.c3, self.b3, self.a3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), _bn(8, g), nn.ReLU6()
        self.c4 = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 10)
        with torch.no_grad():  # very unequal channel ranges, as in real depthwise nets
            self.c2.weight.mul_(torch.logspace(-1, 1, 8).view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.c2(x)))
        x = self.a3(self.b3(self.c3(x)))
        return self.fc(self.c4(x).mean((2, 3)))


def _x(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2


def test_equalization_keeps_outputs_and_relu6_modes():
    net = Chain().eval()
    fold_bn(net)
    x = _x()
    with torch.no_grad():
        ref = net(x)
        pairs = find_equalization_pairs(net)
        assert [(a, b) for a, b, _ in pairs] == [("c1", "c2"), ("c2", "c3"), ("c3", "c4")]
        clip = copy.deepcopy(net)
        info = equalize(clip, "clip")
        assert info["replaced"] == ["a2", "a3"] and isinstance(clip.a2, ChannelClip)
        assert (clip(x) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
        skip = copy.deepcopy(net)
        assert equalize(skip, "skip")["pairs"] == [["c1", "c2"]]  # the other two pass through ReLU6
        assert (skip(x) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
        relu = copy.deepcopy(net)
        equalize(relu, "relu")
        assert torch.isinf(relu.a2.upper).all()


def test_equalization_closed_form_ranges():
    """One pair, one sweep: r1_i / s_i == r2_i * s_i == sqrt(r1_i r2_i)."""
    net = Chain().eval()
    fold_bn(net)
    r1 = net.c1.weight.detach().abs().flatten(1).amax(1)
    r2 = net.c2.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    eq = copy.deepcopy(net)
    equalize(eq, "skip", iterations=1)  # only (c1, c2) is equalized
    new1 = eq.c1.weight.detach().abs().flatten(1).amax(1)
    new2 = eq.c2.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    expect = torch.sqrt(r1 * r2)
    assert torch.allclose(new1, expect, rtol=1e-5) and torch.allclose(new2, expect, rtol=1e-5)
    s = torch.sqrt(r1 * r2) / r2
    assert torch.allclose(eq.c1.bias, net.c1.bias / s, rtol=1e-5)


def test_depthwise_pair_ranges_equal_after_sweeps():
    net = Chain().eval()
    fold_bn(net)
    equalize(net, "clip", iterations=30)
    r_dw_out = net.c3.weight.detach().abs().flatten(1).amax(1)
    r_pw_in = net.c4.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    assert torch.allclose(r_dw_out, r_pw_in, rtol=1e-3)  # last pair is equalized exactly in every sweep


def test_bias_correction_removes_mean_shift_of_linear():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    q = QuantLinear.from_float(lin, 3, None, False)
    calibrate_weights(q, "minmax")
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0])
    noise = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    x = mu + noise - noise.mean(0)  # the sample mean is exactly mu
    wq = q.wq(q.weight).detach()
    expected_shift = (wq - lin.weight.detach()) @ mu
    b0 = q.bias.detach().clone()
    correct_bias(q, [x[:32], x[32:]], torch.device("cpu"))
    assert torch.allclose(b0 - q.bias.detach(), expected_shift, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(q(x).mean(0), lin(x).mean(0), atol=1e-5)


@pytest.mark.parametrize("stride", [1, 5])
def test_output_search_picks_bruteforce_optimum(stride):
    torch.manual_seed(0)
    lin = nn.Linear(16, 5)
    q = QuantLinear.from_float(lin, 4, 3, False)
    calibrate_weights(q, "lp")
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(96, 16, generator=g)) * torch.rand(1, 16, generator=g) * 3
    x[0, 3] = 40.0  # an outlier
    stats = search_act_output(q, [x[:48], x[48:]], torch.device("cpu"), candidates=25, stride=stride)
    # coarse-to-fine: 5 coarse points + at most 2 x 8 neighbours, fewer than the 25 of the exhaustive grid
    assert stats[""]["evaluated"] == 25 if stride == 1 else stats[""]["evaluated"] <= 5 + 16
    with torch.no_grad():
        ref = lin(x)
        wq = q.wq(q.weight)
        errs = []
        for k in range(25, 0, -1):
            s, z = qparams_from_range(torch.tensor([0.0]), torch.tensor([40.0 * k / 25]), 0, 7, True)
            xq = torch.clamp(torch.round(x / s), 0, 7) * s
            errs.append((torch.nn.functional.linear(xq, wq, q.bias) - ref).pow(2).sum().item())
    best = 1 - errs.index(min(errs)) / 25
    assert stats[""]["ratio"] == pytest.approx(best)
    assert errs[errs.index(min(errs))] <= errs[0]  # never worse than min/max
    assert q.aq.scale.item() == pytest.approx(40.0 * best / 7, rel=1e-6)


def _brute(params, table, budget):
    best = (math.inf, None)
    for combo in itertools.product(*[sorted(t) for t in table]):
        size = sum(n * b for n, b in zip(params, combo))
        if size <= budget:
            s = sum(t[b] for t, b in zip(table, combo))
            if s < best[0]:
                best = (s, list(combo))
    return best


def test_allocator_matches_bruteforce_and_respects_budget():
    g = torch.Generator().manual_seed(0)
    bits = (2, 3, 4, 6, 8)
    for trial in range(6):
        params = [int(v) for v in torch.randint(3, 40, (4,), generator=g)]
        table = []
        for _ in params:  # decreasing sensitivity with bits, as measured ones are
            v = sorted(torch.rand(5, generator=g).tolist(), reverse=True)
            table.append({b: v[i] * 10 ** (-i) for i, b in enumerate(bits)})
        lo, hi = 2 * sum(params), 8 * sum(params)
        for budget in (lo, (lo + hi) // 3, (lo + hi) // 2, hi - 5, hi):
            got, total, front = allocate(params, table, budget)
            best, combo = _brute(params, table, budget)
            assert total == pytest.approx(best, rel=1e-12, abs=1e-15)
            assert sum(n * b for n, b in zip(params, got)) <= budget
            assert sum(t[b] for t, b in zip(table, got)) == pytest.approx(best, rel=1e-12, abs=1e-15)
            assert all(front[i][1] > front[i + 1][1] for i in range(len(front) - 1))
    # coarse DP units (resolution 7): rounding up keeps every answer within budget
    params = [1000, 333, 2047]
    table = [{2: 5.0, 4: 1.0, 8: 0.0}, {2: 2.0, 4: 0.5, 8: 0.0}, {2: 9.0, 4: 2.0, 8: 0.0}]
    for budget in range(2 * sum(params), 8 * sum(params), 997):
        got, _, _ = allocate(params, table, budget, resolution=7)
        assert sum(n * b for n, b in zip(params, got)) <= budget


def test_bad_budgets_are_one_line_errors():
    fp32, min_bits = 32 * 1000, 2 * 1000
    assert parse_size_budget("0.125x", fp32, min_bits) == 4000
    assert parse_size_budget("0.0005MB", fp32, min_bits) == 4000
    for text, word in (("1MB", "larger than the FP32"), ("1.5x", "larger than the FP32"),
                       ("0.0001MB", "below the all-2-bit"), ("0.01x", "below the all-2-bit"), ("lots", "not a size")):
        with pytest.raises(ZkdError, match=word) as e:
            parse_size_budget(text, fp32, min_bits)
        assert "\n" not in str(e.value)


def test_choose_bits_fits_budget_and_keeps_exempt_layers():
    net = Chain().eval()
    fold_bn(net)
    config = QuantConfig(4, 4)
    mp = choose_bits(net, config, _x(32), torch.device("cpu"), "0.15x", candidates=10)
    assert mp.bits["c1"] == 8 and mp.bits["fc"] == 8  # keep-8bit first,last
    size = sum(mp.params[n] * b for n, b in mp.bits.items())
    assert size == mp.size_bits <= mp.budget_bits == math.floor(0.15 * mp.fp32_bits)
    # sensitivity at 8 bits is below that at 2 bits for every layer
    assert all(r[8] <= r[2] for r in mp.sensitivity.values())


def test_pipeline_equalize_mixed_student_reloads_bit_exact(tmp_path):
    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    config = QuantConfig(4, 4)
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, batch_size=16, candidates=10,
                              equalize=True, bias_correction=True, mixed_precision=True, size_budget="0.15x",
                              progress=False)
    res = calibrate_student(teacher, config, opts, torch.device("cpu"))
    assert isinstance(res.student.a2, ChannelClip) and isinstance(res.fp_model.a2, ChannelClip)
    assert {n: lc.w_bits for n, lc in res.layers.items()} == res.report["mixed_precision"]["bits"]
    path = tmp_path / "s.pt"
    save_student(path, res.student, config, res.layers, teacher, res.folded, None)
    loaded = load_student(path, model=Chain())
    x = _x(4, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.student(x))
    assert [lc.w_bits for _, lc in res.layers.items()] == [l.wq.bits for _, l in quant_layers(loaded)]


def test_validation_data_replaces_held_out_quarter_and_probe():
    """With --validation-data the guard scores on those images alone (its KL is the student's KL there, computed
    directly), every calibration image fits, and the --data source itself is refused."""
    from zeroshot_kd.data import make_dataset

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, batch_size=16, candidates=10,
                              validation_data="gaussian:24", validation_images=24, recon=False, progress=False)
    res = calibrate_student(teacher, QuantConfig(4, 4), opts, "cpu")
    ranges = res.report["ranges"]
    assert ranges["fit_images"] == 32 and ranges["kl_images"] == 24 and ranges["validation"] == "validation data"
    assert ranges["validation_data"] == "gaussian:24" and "24 images of --validation-data" in ranges["images"]
    val = make_dataset("gaussian:24", FASHION_MNIST_SPEC, num_images=24, seed=opts.seed + 2)
    x = torch.stack([val[i][0] for i in range(24)])
    assert ranges["kl_by_candidate"][ranges["chosen"]] == pytest.approx(_kl_to(res.student, net, x), rel=1e-4)
    with pytest.raises(ZkdError, match="validation-data is the --data source"):
        CalibrationOptions(data="gaussian:32", validation_data="gaussian:32")


def test_cli_validation_data(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    base = ["calibrate", "--teacher", "fmnist_mobilenetv2", "--data", "gaussian:32", "--num-images", "32",
            "--holdout", "0", "--candidates", "10", "--batch-size", "16", "--no-recon", "--device", "cpu"]
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "bad.pt"), "--validation-data", "gaussian:32"])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("zkd: error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "is the --data source" in errors[0], r.output
    assert not (tmp_path / "bad.pt").exists()
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "s.pt"), "--validation-data", "gaussian:16",
                                        "--validation-images", "16"])
    assert r.exit_code == 0, r.output
    assert "16 images of --validation-data gaussian:16" in r.output


def test_activation_criterion_equalizes_activation_and_weight_ranges():
    """With measured activations: a_i / s_i == r2_i * s_i after one sweep of a single pair."""
    net = Chain().eval()
    fold_bn(net)
    x = _x(8)
    eq = copy.deepcopy(net)
    from zeroshot_kd.quant.equalize import activation_ranges

    a0 = activation_ranges(net, find_equalization_pairs(net)[:1], [x], torch.device("cpu"))["c1"]
    r2 = net.c2.weight.detach().abs().transpose(0, 1).flatten(1).amax(1).double()
    info = equalize(eq, "skip", iterations=1, batches=[x])
    assert info["criterion"] == "activation"
    a1 = activation_ranges(eq, find_equalization_pairs(eq)[:1], [x], torch.device("cpu"))["c1"]
    new2 = eq.c2.weight.detach().abs().transpose(0, 1).flatten(1).amax(1).double()
    assert torch.allclose(a1, torch.sqrt(a0 * r2), rtol=1e-4) and torch.allclose(new2, torch.sqrt(a0 * r2), rtol=1e-4)
    with torch.no_grad():
        assert (eq(x) - net(x)).abs().max().item() <= 1e-5 * max(1.0, net(x).abs().max().item())


def test_cli_mixed_precision_equalize_and_bad_budgets(tmp_path):
    import json

    from click.testing import CliRunner

    from cli.main import cli

    base = ["calibrate", "--teacher", "fmnist_mobilenetv2", "--data", "gaussian:32", "--num-images", "32",
            "--holdout", "0", "--candidates", "10", "--batch-size", "16", "--no-recon", "--probe-iterations", "20",
            "--device", "cpu", "-q"]
    for budget, msg in (("100MB", "larger than the FP32"), ("0.01x", "below the all-2-bit"), ("big", "not a size")):
        r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "bad.pt"), "--mixed-precision",
                                            "--size-budget", budget])
        assert r.exit_code == 2 and "Traceback" not in r.output
        errors = [ln for ln in r.output.splitlines() if ln.startswith("zkd: error:")]
        assert len(errors) == 1 and msg in errors[0], r.output
        assert not (tmp_path / "bad.pt").exists()
    out = tmp_path / "s.pt"
    r = CliRunner().invoke(cli, base + ["--out", str(out), "--equalize", "--bias-correction", "--mixed-precision",
                                        "--size-budget", "0.125x"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    mp = rep["mixed_precision"]
    assert mp["size_mb"] <= mp["budget_mb"] + 1e-12 and mp["ratio_of_fp32"] <= 0.125
    assert mp["size_mb"] == pytest.approx(sum(mp["params"][n] * b for n, b in mp["bits"].items()) / 8e6)
    assert mp["predicted_sensitivity"] <= mp["uniform_sensitivity"] + 1e-12  # uniform W4 fits 0.125x too
    assert {r_["layer"]: r_["w_bits"] for r_ in rep["layers"]} == mp["bits"]
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = load_student(out)
    assert student.zkd_info["layers"]["features.1.conv.0.0"]["w_bits"] == mp["bits"]["features.1.conv.0.0"]


def test_pre_steps_default_on_only_with_every_layer_quantized():
    """Outside the auto guard (an explicit --a-method), the pre-steps default on only with every layer quantized."""
    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    reports = {}
    for keep in ("first,last", "none"):
        opts = CalibrationOptions(data="gaussian:16", num_images=16, holdout=0, candidates=5, progress=False,
                                  a_method="output", probe_iterations=20)
        reports[keep] = calibrate_student(teacher, QuantConfig(4, 4, keep_8bit=keep), opts,
                                          torch.device("cpu")).report
    assert reports["first,last"]["equalization"] is None and reports["first,last"]["bias_correction"] is None
    assert reports["none"]["equalization"]["pairs"] == [["c1", "c2"], ["c2", "c3"], ["c3", "c4"]]
    assert set(reports["none"]["bias_correction"]) == {"c1", "c2", "c3", "c4", "fc"}


def _kl_to(student: nn.Module, net: nn.Module, x: torch.Tensor) -> float:
    """Batchmean ``KL(p_net || p_student)`` computed directly."""
    with torch.no_grad():
        return torch.nn.functional.kl_div(torch.log_softmax(student(x), 1), torch.log_softmax(net(x), 1),
                                          reduction="batchmean", log_target=True).item()


def test_default_guard_keeps_lowest_validation_kl_candidate():
    """The default (auto) builds {mse, output, minmax} x {pre-steps off, on} plus naive min/max, scores each by the
    logit KL to the teacher on the validation images (the BN probe alone; every calibration image fits), and
    returns the student of the minimum."""
    from zeroshot_kd.quant.validation import PROBE_ITERATIONS, bn_probe

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, candidates=5, recon=False,
                              probe_images=16, probe_iterations=100, validation="probe", progress=False)
    assert opts.a_method == "auto" and CalibrationOptions(data="x").probe_iterations == PROBE_ITERATIONS == 500
    res = calibrate_student(teacher, QuantConfig(3, 3, keep_8bit="none"), opts, torch.device("cpu"))
    g = res.report["ranges"]
    kls = g["kl_by_candidate"]
    assert set(kls) == {f"{m}{s}" for m in ("mse", "output", "minmax") for s in ("", "+cle+bc")} | {"naive"}
    assert g["chosen"] == min(kls, key=kls.get)
    assert (res.report["equalization"] is not None) == g["chosen"].endswith("+cle+bc") == g["equalize"]
    assert (g["validation"], g["validation_images"], g["kl_images"], g["fit_images"]) == ("probe", 16, 16, 32)
    assert g["images"].startswith("16 BN-probe images, 100 steps; calibration images ")
    probe = bn_probe(teacher, 16, opts.seed, torch.device("cpu"), iterations=100)
    kl = _kl_to(res.student, net, probe)
    assert kl == pytest.approx(kls[g["chosen"]], rel=1e-5, abs=1e-9)


def test_guard_scores_held_out_quarter_without_probe():
    """With no probe (--probe-images 0, or a teacher without BN layers) the guard scores on the last quarter of the
    calibration images and fits the ranges on the other three quarters."""
    from zeroshot_kd.data import make_dataset
    from zeroshot_kd.quant.validation import guard_split

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, candidates=5, recon=False,
                              probe_images=0, progress=False)
    res = calibrate_student(teacher, QuantConfig(4, 4), opts, torch.device("cpu"))
    g = res.report["ranges"]
    assert guard_split(32) == 8 and (g["validation"], g["kl_images"], g["fit_images"]) == ("held-out", 8, 24)
    ds = make_dataset("gaussian:32", FASHION_MNIST_SPEC, num_images=32, seed=0)
    held = torch.stack([ds[i][0] for i in range(24, 32)])
    assert _kl_to(res.student, net, held) == pytest.approx(g["kl_by_candidate"][g["chosen"]], rel=1e-5, abs=1e-9)


def test_naive_guard_candidate_is_min_max(monkeypatch):
    """The guard's ``naive`` candidate is the min/max reference: per-channel weight scale max|w| / q_max and the
    activation range of the fit images, nothing searched (forced to win here by scoring it lowest)."""
    from zeroshot_kd.quant import validation

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    real_score = validation.Validation.score
    calls = []

    def score(self, model, device, precision="fp32"):  # the naive candidate is scored last, by Validation.score
        calls.append(model)
        return -1.0 if len(calls) == 1 else real_score(self, model, device, precision)

    monkeypatch.setattr(validation.Validation, "score", score)
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, candidates=5, recon=False,
                              probe_images=0, progress=False)
    res = calibrate_student(teacher, QuantConfig(4, 4, keep_8bit="none"), opts, torch.device("cpu"))
    assert res.report["ranges"]["chosen"] == "naive" and res.report["equalization"] is None
    fit = torch.stack([torch.as_tensor(x) for x, _ in
                       __import__("zeroshot_kd.data", fromlist=["make_dataset"]).make_dataset(
                           "gaussian:32", FASHION_MNIST_SPEC, num_images=32, seed=0)])[:24]
    for name, layer in quant_layers(res.student):
        w = layer.weight.detach().flatten(1)
        assert torch.allclose(layer.wq.scale.flatten(), w.abs().amax(1) / layer.wq.qmax, rtol=1e-6)
    c1 = dict(quant_layers(res.student))["c1"]
    lo, hi = min(fit.min().item(), 0.0), max(fit.max().item(), 0.0)
    assert c1.aq.scale.item() == pytest.approx((hi - lo) / (c1.aq.qmax - c1.aq.qmin), rel=1e-6)


def test_finetune_check_keeps_the_closer_student():
    """Fine-tuning is kept only if it lowers the validation KL: with a learning rate that wrecks the student the
    pipeline keeps the student from before fine-tuning, with a small one the fine-tuned student when it is closer;
    either way the final student's KL on the validation images (computed here directly) is the kept one's."""
    from zeroshot_kd.quant.report import finetune_check_line
    from zeroshot_kd.quant.validation import bn_probe

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    cpu = torch.device("cpu")
    vx = bn_probe(teacher, 8, 0, cpu)
    seen = []
    for lr in (10.0, 1e-3):
        opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, candidates=5, recon=False,
                                  finetune_steps=6, lr=lr, batch_size=8, probe_images=8, validation="probe",
                                  progress=False)
        res = calibrate_student(teacher, QuantConfig(4, 4), opts, cpu)
        fc = res.report["finetune_check"]
        kept = fc["finetune_kl"] - fc["before_kl"] <= fc["tolerance_se"] * fc["se"]
        assert fc["kept"] == ("finetune" if kept else "before")
        assert _kl_to(res.student, net, vx) == pytest.approx(fc["finetune_kl"] if kept else fc["before_kl"],
                                                             rel=1e-5, abs=1e-9)
        seen.append(fc["kept"])
        assert finetune_check_line(fc).endswith("from before fine-tuning" if fc["kept"] == "before"
                                                else "the fine-tuned student")
        rise = (fc["finetune_kl"] - fc["before_kl"]) / fc["se"]
        assert f"({rise:+.1f} SE, tolerance {opts.check_tolerance:g} SE)" in finetune_check_line(fc)
    assert seen[0] == "before"  # lr 10 moves every weight and step size far off


def test_bn_probe_matches_bn_statistics_and_is_seeded():
    """The probe is deterministic in the seed, differs across seeds, and is much closer to the teacher's BN
    statistics (BNS-KL, computed directly) than clipped Gaussian noise, where it starts; no BN layers: no probe."""
    from zeroshot_kd.bn import BNStatsHook, bns_kl_loss
    from zeroshot_kd.quant.validation import bn_probe

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    cpu = torch.device("cpu")
    a, b, c = bn_probe(teacher, 16, 0, cpu), bn_probe(teacher, 16, 0, cpu), bn_probe(teacher, 16, 1, cpu)
    assert a.shape == (16, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)

    def bns(x: torch.Tensor) -> float:
        with BNStatsHook(net) as hook, torch.no_grad():
            net(x)
        return float(bns_kl_loss(hook.stats))

    noise = FASHION_MNIST_SPEC.clamp(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5)))
    assert bns(a) < 0.5 * bns(noise)  # 500 steps on this random net
    shorter = bn_probe(teacher, 16, 0, cpu, iterations=50)  # --probe-iterations: the same start, fewer steps
    assert bns(a) < 0.9 * bns(shorter) and bns(shorter) < 0.75 * bns(noise)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(10))
    plain(torch.zeros(1, 1, 28, 28))
    assert bn_probe(Teacher(plain, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(plain)), 16, 0, cpu) is None


def test_validation_auto_holds_out_close_images_and_probes_far_ones():
    """--validation auto: the calibration images' own held-out quarter when the teacher's BN statistics call them
    close to its training data (real Fashion-MNIST for the shipped teacher), else the BN probe (Gaussian noise);
    the explicit choices and --probe-images 0 override it."""
    from zeroshot_kd import load_teacher
    from zeroshot_kd.quant.validation import CLOSE_VERDICT, validation_kind

    assert validation_kind("auto", CLOSE_VERDICT, 64) == "held-out"
    assert validation_kind("auto", "usable", 64) == validation_kind("auto", "far", 64) == "probe"
    assert validation_kind("probe", CLOSE_VERDICT, 64) == "probe" and validation_kind("held-out", "far", 64) == "held-out"
    assert validation_kind("probe", "far", 0) == validation_kind("auto", "far", 0) == "held-out"
    teacher = load_teacher("fmnist_resnet14", device="cpu")
    seen = {}
    for data in ("fashion-mnist:train", "gaussian:32"):
        opts = CalibrationOptions(data=data, num_images=32, holdout=0, candidates=5, recon=False, probe_images=8,
                                  probe_iterations=5, a_method="auto", progress=False)
        r = calibrate_student(teacher, QuantConfig(8, 8), opts, "cpu").report["ranges"]
        seen[data] = (r["validation"], r["calibration_verdict"], r["kl_images"], r["fit_images"])
    assert seen["fashion-mnist:train"] == ("held-out", CLOSE_VERDICT, 8, 24)
    assert seen["gaussian:32"] == ("probe", "far", 8, 32)


def _counted_probes(monkeypatch) -> tuple[nn.Module, Teacher, list]:
    """The Chain net, its Teacher, and the list that records every probe synthesis (an empty process cache)."""
    from zeroshot_kd import synthesis
    from zeroshot_kd.quant import validation

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    calls = []
    real = synthesis.optimize_batch

    def counting(*a, **k):
        calls.append(a[3].seed)
        return real(*a, **k)

    monkeypatch.setattr(synthesis, "optimize_batch", counting)
    monkeypatch.setattr(validation, "_PROBES", {})
    return net, teacher, calls


def test_bn_probe_is_computed_once_per_teacher_and_arguments(monkeypatch):
    """A second probe of the same weights, spec, size, seed and steps comes from the process cache (no synthesis),
    equal to the first; other arguments, or a Teacher without a weights hash, synthesize again."""
    from zeroshot_kd.quant import validation

    net, teacher, calls = _counted_probes(monkeypatch)
    cpu = torch.device("cpu")
    first = validation.bn_probe(teacher, 8, 0, cpu, iterations=20)
    again = validation.bn_probe(teacher, 8, 0, "cpu", iterations=20)
    assert len(calls) == 1 and torch.equal(first, again)
    validation.bn_probe(teacher, 8, 1, cpu, iterations=20)
    anonymous = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, "")
    validation.bn_probe(anonymous, 8, 0, cpu, iterations=20)
    validation.bn_probe(anonymous, 8, 0, cpu, iterations=20)
    assert len(calls) == 4


def test_bn_probe_is_kept_on_disk_between_processes(monkeypatch, probe_cache):
    """With the process cache cleared (a new run), the probe is read back from ``$ZKD_CACHE_DIR/probes``, equal to the
    synthesized one, without synthesis; a damaged file or ``ZKD_CACHE_DIR=off`` means synthesis again, with the same
    images; another seed is another file."""
    from zeroshot_kd.quant import validation

    net, teacher, calls = _counted_probes(monkeypatch)
    cpu = torch.device("cpu")
    assert validation.probe_cache_dir() == probe_cache / "probes"
    first = validation.bn_probe(teacher, 8, 0, cpu, iterations=20)
    files = sorted((probe_cache / "probes").glob("*.pt"))
    assert len(calls) == 1 and len(files) == 1
    validation.clear_probe_cache()
    assert torch.equal(validation.bn_probe(teacher, 8, 0, cpu, iterations=20), first) and len(calls) == 1
    validation.clear_probe_cache()
    files[0].write_bytes(b"not a torch file")
    assert torch.equal(validation.bn_probe(teacher, 8, 0, cpu, iterations=20), first) and len(calls) == 2
    validation.bn_probe(teacher, 8, 1, cpu, iterations=20)
    assert len(calls) == 3 and len(list((probe_cache / "probes").glob("*.pt"))) == 2
    monkeypatch.setenv("ZKD_CACHE_DIR", "off")
    validation.clear_probe_cache()
    assert validation.probe_cache_dir() is None
    assert torch.equal(validation.bn_probe(teacher, 8, 0, cpu, iterations=20), first) and len(calls) == 4


def _kl_each(student: nn.Module, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``KL(p_net || p_student)`` of each image, computed directly in float64."""
    with torch.no_grad():
        ls, lt = torch.log_softmax(student(x).double(), 1), torch.log_softmax(net(x).double(), 1)
        return (lt.exp() * (lt - ls)).sum(1)


def test_check_keeps_a_step_unless_its_kl_rises_beyond_the_paired_noise():
    """The check's verdict equals the paired rule computed directly: keep ``after`` unless mean(d) > tolerance *
    std(d) / sqrt(n) with d = per-image KL after - before; the boundary is at tolerance = mean(d) / SE exactly; a
    wrecked student is rejected, a better one kept."""
    from zeroshot_kd.quant.validation import CHECK_TOLERANCE, make_validation

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    cpu = torch.device("cpu")
    x = _x(48, seed=3)
    val = make_validation(teacher, x, "held-out", cpu, batch_size=16)  # three batches: images kept in order
    near, close, bad = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        near.fc.weight.add_(0.5 * torch.randn(near.fc.weight.shape, generator=g))
        close.fc.weight.add_(0.5 * torch.randn(close.fc.weight.shape, generator=g))
        bad.fc.weight.mul_(-1.0)
    seen = {}
    for name, before, after in (("noise", near, close), ("noise'", close, near), ("bad", near, bad),
                                ("good", bad, near)):
        kb, ka = _kl_each(before, net, x), _kl_each(after, net, x)
        d = ka - kb
        se = (d.std() / len(d) ** 0.5).item()
        v = val.compare(before, after, cpu)
        assert v.kl_before == pytest.approx(kb.mean().item(), rel=1e-5, abs=1e-9)
        assert v.kl_after == pytest.approx(ka.mean().item(), rel=1e-5, abs=1e-9)
        assert v.se == pytest.approx(se, rel=1e-3)
        assert v.kept is (d.mean().item() <= CHECK_TOLERANCE * se)
        assert val.compare(before, after, cpu, tolerance=0.0).kept is (d.mean().item() <= 0)
        seen[name] = (v.kept, d.mean().item() / se)
    # the boundary sits at tolerance = rise / SE: just above it the worse perturbation is kept, just below rejected
    worse = ("noise", near, close) if seen["noise"][1] > 0 else ("noise'", close, near)
    t = seen[worse[0]][1]
    assert t > 0
    assert val.compare(worse[1], worse[2], cpu, tolerance=t * 1.001).kept
    assert not val.compare(worse[1], worse[2], cpu, tolerance=t * 0.999).kept
    assert not seen["bad"][0] and seen["good"][0]


def test_reconstruction_check_keeps_the_reported_student():
    """The pipeline's final student is the one its reconstruction check kept: its KL on the validation images
    (computed here directly) is the kept student's, and ``kept`` follows the paired rule on the reported values."""
    from zeroshot_kd.quant.report import recon_check_line

    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    cpu = torch.device("cpu")
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, candidates=5, recon=True,
                              recon_iters=4, probe_images=8, validation="probe", progress=False)
    res = calibrate_student(teacher, QuantConfig(3, 3, keep_8bit="none"), opts, cpu)
    rc = res.report["recon_check"]
    assert rc["tolerance_se"] == opts.check_tolerance
    assert rc["kept"] == ("reconstruction" if rc["recon_kl"] - rc["ptq_kl"] <= rc["tolerance_se"] * rc["se"]
                          else "ptq")
    from zeroshot_kd.quant.validation import bn_probe

    line = recon_check_line(rc)
    assert line.endswith("kept the reconstructed student" if rc["kept"] == "reconstruction" else "kept the PTQ student")
    assert f"({(rc['recon_kl'] - rc['ptq_kl']) / rc['se']:+.1f} SE, tolerance 2 SE)" in line
    vx = bn_probe(teacher, 8, 0, cpu)
    kept_kl = rc["recon_kl"] if rc["kept"] == "reconstruction" else rc["ptq_kl"]
    assert _kl_to(res.student, net, vx) == pytest.approx(kept_kl, rel=1e-5, abs=1e-9)


def test_clipped_normal_mean_matches_quadrature():
    from zeroshot_kd.quant.equalize import clipped_normal_mean

    mu = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0, 8.0], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.2, 1.5, 1.0], dtype=torch.float64)
    y = torch.linspace(-40, 40, 400001, dtype=torch.float64).view(-1, 1)
    pdf = torch.exp(-0.5 * ((y - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    for lower, upper in ((0.0, None), (0.0, 6.0), (None, None), (-1.0, 2.5)):
        f = y if lower is None and upper is None else y.clamp(min=lower, max=upper)
        quad = torch.trapezoid(f * pdf, y.view(-1), dim=0)
        assert torch.allclose(clipped_normal_mean(mu, sigma, lower, upper), quad, atol=1e-7)
    assert clipped_normal_mean(torch.tensor([-1.0, 2.0, 9.0]), torch.zeros(3), 0.0, 6.0).tolist() == [0.0, 2.0, 6.0]


def test_analytic_bias_correction_removes_expected_shift_of_linear():
    from zeroshot_kd.quant.equalize import correct_bias_analytic

    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    q = QuantLinear.from_float(lin, 3, None, False)
    calibrate_weights(q, "minmax")
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0])
    noise = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    x = mu + noise - noise.mean(0)  # the sample mean is exactly mu
    b0 = q.bias.detach().clone()
    expected_shift = (q.wq(q.weight).detach() - lin.weight.detach()) @ mu
    assert expected_shift.abs().max() > 1e-2  # 3-bit weights do shift the mean
    correct_bias_analytic(q, {"": mu})
    assert torch.allclose(b0 - q.bias.detach(), expected_shift, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(q(x).mean(0), lin(x).mean(0), atol=1e-5)


def test_analytic_input_means_follow_bn_through_equalization():
    """B's input mean is the clipped-normal mean of A's BN output, also after CLE rescaled A's channels."""
    from zeroshot_kd.quant.equalize import analytic_input_means, bn_stats, clipped_normal_mean
    from zeroshot_kd.quant.fold import find_conv_bn_pairs

    net = Chain().eval()
    stats = bn_stats(net, find_conv_bn_pairs(net)[0])
    beta1, gamma1 = net.b1.bias.detach().double(), net.b1.weight.detach().double().abs()
    fold_bn(net)
    means = analytic_input_means(net, stats)
    assert set(means) == {"c2", "c3", "c4"}
    assert torch.allclose(means["c2"], clipped_normal_mean(beta1, gamma1, 0.0, None))
    w_before = net.c1.weight.detach().double().flatten(1).abs().amax(1)
    equalize(net, "clip", stats=stats)
    s = w_before / net.c1.weight.detach().double().flatten(1).abs().amax(1)  # c1's channel scales
    assert torch.allclose(stats["c1"][0], beta1 / s) and torch.allclose(stats["c1"][1], gamma1 / s)


def test_high_bias_absorption_leaves_float_outputs_unchanged():
    from zeroshot_kd.quant.equalize import absorb_high_bias, bn_stats
    from zeroshot_kd.quant.fold import find_conv_bn_pairs

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.c1, self.b1, self.a1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), _bn(6, g), nn.ReLU()
            self.c2, self.b2, self.a2 = nn.Conv2d(6, 4, 1, bias=False), _bn(4, g), nn.ReLU()
            self.c3 = nn.Conv2d(4, 3, 3, padding=1)  # padded: nothing is absorbed into it
            with torch.no_grad():
                self.b1.bias.copy_(torch.tensor([5.0, 4.0, -1.0, 0.2, 9.0, 3.0]))
                self.b1.running_var.mul_(1e4)  # pre-activations stay within beta +- 3 gamma on the test inputs

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c3(self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x)))))))

    net = Net().eval()
    stats = bn_stats(net, find_conv_bn_pairs(net)[0])
    beta, gamma = stats["c1"][0].clone(), stats["c1"][1].clone()
    fold_bn(net)
    x = _x(8)
    with torch.no_grad():
        ref = net(x)
        b1, b2 = net.c1.bias.detach().clone(), net.c2.bias.detach().clone()
    absorbed = absorb_high_bias(net, stats)
    c = (beta - 3 * gamma).clamp_min(0)
    assert set(absorbed) == {"c1"} and (c > 0).sum() >= 4
    assert torch.allclose(b1 - net.c1.bias.detach(), c.float(), atol=1e-6)
    assert torch.allclose(net.c2.bias.detach() - b2, (net.c2.weight.detach().double().sum((2, 3)) @ c).float(),
                          atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-5)


def test_pipeline_analytic_bias_correction_and_absorption_options():
    net = Chain().eval().requires_grad_(False)
    teacher = Teacher(net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(net))
    opts = CalibrationOptions(data="gaussian:16", num_images=16, holdout=0, candidates=5, progress=False,
                              a_method="output", equalize=False, bias_correction=True,
                              bias_correction_mode="analytic", absorb_bias=True)
    rep = calibrate_student(teacher, QuantConfig(4, 4, keep_8bit="none"), opts, torch.device("cpu")).report
    assert set(rep["bias_correction"]) == {"c2", "c3", "c4"}  # fed by conv + BN; c1 (input) and fc (pool) are not
    c = (net.b1.bias.detach().double() - 3 * net.b1.weight.detach().double().abs()).clamp_min(0)
    # only c1 -> ReLU -> c2 (1x1) qualifies; the ReLU6 pairs do not
    assert rep["equalization"]["high_bias_absorbed"] == ({"c1": pytest.approx(c.max().item())} if c.max() > 0 else {})
    with pytest.raises(ZkdError, match="bias-correction-mode"):
        CalibrationOptions(data="gaussian:16", bias_correction_mode="exact")
