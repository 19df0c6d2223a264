"""The calibration pipeline on a small random teacher: student files reload bit-exactly, runs are reproducible,
reconstruction and fine-tuning reduce their losses, the teacher is never modified."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import spy_rand
from zeroshot_kd.augment import mixup_batch, shift_flip_batch
from zeroshot_kd.data import FASHION_MNIST_SPEC, make_dataset
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.objectives import Objective, ObjectiveSet, build
from zeroshot_kd.objectives.base import KDBatch
from zeroshot_kd.quant.finetuning import finetune
from zeroshot_kd.quant.modules import QuantConfig, quant_layers
from zeroshot_kd.quant.pipeline import RECON_DEFAULT_ITERS, CalibrationOptions, calibrate_student, recon_by_default
from zeroshot_kd.quant.fakequant import FakeQuantizer
from zeroshot_kd.quant.recon import PAPER_ITERS, PAPER_LR_ROUND, ReconConfig, find_blocks, reconstruct, round_lr
from zeroshot_kd.quant.report import rounding_rate_line
from zeroshot_kd.similarity import VERDICT_FAR
from zeroshot_kd.quant.student import FORMAT_VERSION, load_student, read_student_file, save_student
from zeroshot_kd.runtime import batch_generator, batch_seed
from zeroshot_kd.teachers import Teacher, state_sha256
from zeroshot_kd.training import shuffled_batches

ARCH = {"builder": "zeroshot_kd.models:cifar_resnet", "kwargs": {"depth": 8, "width": 4}}


@pytest.fixture()
def small_teacher(small_net) -> Teacher:
    small_net.requires_grad_(False)
    return Teacher(small_net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(small_net))


def run(teacher, config, **kw):
    """The PTQ path (reconstruction, on by default at <= 4 bits, is asked for explicitly where a test wants it)."""
    opts = dict(data="gaussian:48", num_images=32, holdout=16, batch_size=16, candidates=20, progress=False,
                recon=False)
    opts.update(kw)
    # a device name works as well as a torch.device
    return calibrate_student(teacher, config, CalibrationOptions(**opts), "cpu")


def test_save_load_bit_exact_and_codes(tmp_path, small_teacher):
    config = QuantConfig(4, 4, w_asym=True)
    res = run(small_teacher, config)
    path = tmp_path / "s.pt"
    save_student(path, res.student, config, res.layers, small_teacher, res.folded, ARCH)
    loaded = load_student(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), res.student(x))
    obj = read_student_file(path)
    for name, layer in quant_layers(res.student):
        s, z = layer.wq.scale.detach().view(-1, 1, 1, 1) if layer.weight.dim() == 4 else \
            layer.wq.scale.detach().view(-1, 1), layer.wq.zero_point.view(-1, *[1] * (layer.weight.dim() - 1))
        codes = torch.clamp(torch.round(layer.weight * (1.0 / s)) + z, layer.wq.qmin, layer.wq.qmax)
        assert torch.equal(obj["codes"][name].float(), codes)
        assert obj["codes"][name].min() >= layer.wq.qmin and obj["codes"][name].max() <= layer.wq.qmax
    assert obj["config"]["convention"].startswith("W4A4")
    assert obj["teacher"]["weights_sha256"] == small_teacher.weights_sha256


def test_same_seed_same_bytes(tmp_path, small_teacher):
    config = QuantConfig(4, 4)
    paths = []
    for i in range(2):
        res = run(small_teacher, config, recon=True, recon_iters=3, finetune_steps=2, lr=1e-4)
        p = tmp_path / f"s{i}.pt"
        save_student(p, res.student, config, res.layers, small_teacher, res.folded, ARCH, {"seed": 0})
        paths.append(p)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_unknown_format_version_and_wrong_files(tmp_path, small_teacher):
    config = QuantConfig(8, 8)
    res = run(small_teacher, config)
    path = tmp_path / "s.pt"
    save_student(path, res.student, config, res.layers, small_teacher, res.folded, ARCH)
    obj = torch.load(path, weights_only=True)
    obj["format_version"] = FORMAT_VERSION + 1
    torch.save(obj, tmp_path / "future.pt")
    with pytest.raises(ZkdError, match="unknown student format version"):
        load_student(tmp_path / "future.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ZkdError, match="not a zkd student file"):
        load_student(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ZkdError, match="cannot read"):
        load_student(tmp_path / "junk.pt")
    with pytest.raises(ZkdError, match="does not exist"):
        load_student(tmp_path / "missing.pt")


def test_teacher_untouched_and_student_folded(small_teacher):
    before = state_sha256(small_teacher.model)
    res = run(small_teacher, QuantConfig(4, 4), finetune_steps=2)
    assert state_sha256(small_teacher.model) == before
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in small_teacher.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in res.student.modules())
    assert len(res.folded) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in small_teacher.model.modules())


def test_no_fold_keeps_bn_in_eval_mode(small_teacher):
    res = run(small_teacher, QuantConfig(8, 8, fold_bn=False), finetune_steps=3, lr=1e-3)
    bns = [m for m in res.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    teacher_bns = [m for m in small_teacher.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and res.folded == []
    for b, t in zip(bns, teacher_bns):  # running statistics did not drift during fine-tuning
        assert torch.equal(b.running_mean, t.running_mean) and torch.equal(b.running_var, t.running_var)


def test_activation_grids_follow_sign(small_teacher):
    res = run(small_teacher, QuantConfig(4, 4, keep_8bit="none"))
    layers = dict(quant_layers(res.student))
    assert layers["conv1"].aq.symmetric is False  # the network input is signed -> asymmetric with zero point
    assert layers["layer1.0.conv1"].aq.symmetric is True  # after ReLU -> unsigned [0, 15]
    assert layers["layer1.0.conv1"].aq.zero_point.item() == 0


def test_finetune_reduces_kd_loss_and_custom_loss(small_teacher):
    from torch.utils.data import TensorDataset

    # MSE ranges (not the default guard, whose start is already near the teacher): leaves a KD loss to reduce
    res = run(small_teacher, QuantConfig(3, 3), a_method="mse")
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(32, dtype=torch.long)
    loss = build(["kd:T=4"])          # finetune's default objective

    def kd(s_logits, t_logits):
        return loss(KDBatch(student_logits=s_logits, teacher_logits=t_logits))[0].item()

    with torch.no_grad():
        t_logits = small_teacher.model(x)
        before = kd(res.student(x), t_logits)
    w_steps = {n: l.wq.scale.detach().clone() for n, l in quant_layers(res.student)}
    a_steps = {n: l.aq.scale.detach().clone() for n, l in quant_layers(res.student) if l.aq is not None}
    hist = finetune(res.student, small_teacher.model, TensorDataset(x, y), steps=30, lr=3e-3, batch_size=32,
                    log_every=10, progress=False)
    with torch.no_grad():
        after = kd(res.student(x), t_logits)
    assert after < before and len(hist) == 3 and hist[-1]["step"] == 30
    # weight steps stay fixed (Adam's absolute steps would move small channels' grids far); activation steps learn
    assert all(torch.equal(l.wq.scale, w_steps[n]) for n, l in quant_layers(res.student))
    assert any(not torch.equal(l.aq.scale, a_steps[n]) for n, l in quant_layers(res.student) if l.aq is not None)
    assert not res.student.training and not any(p.requires_grad for p in res.student.parameters())
    # the documented default: T^2 * KL(p_t^T || p_s^T), batchmean
    s = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    t = torch.randn(4, 10, generator=torch.Generator().manual_seed(6))
    pt, ps = torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)
    expected = 16 * (pt * (pt.log() - ps.log())).sum(1).mean()
    assert kd(s, t) == pytest.approx(expected.item(), rel=1e-5)
    seen = []

    class MSE(Objective):
        name = "mse"

        def forward(self, batch):
            seen.append((batch.inputs.detach().clone(), batch.labels.clone(), batch.teacher_logits.detach().clone()))
            return (batch.student_logits - batch.teacher_logits).pow(2).mean()

    hist = finetune(copy.deepcopy(res.student), small_teacher.model, TensorDataset(x, y), steps=2,
                    objectives=ObjectiveSet([MSE()]), batch_size=32, seed=5, progress=False)
    assert [b[0].shape[0] for b in seen] == [32, 32] and "mse" in hist[-1]
    # mixup (the default): step t sees the epoch's order mixed by batch_generator(seed, t, "finetune-mixup"), and
    # the teacher answers on the mixed images; mixed images' labels become unknown
    for step, (inputs, labels, t_logits) in enumerate(seen):
        order = shuffled_batches(32, 32, batch_generator(5, step, "finetune"), drop_last=True)[0]
        mixed, mixed_y = mixup_batch(x[order], y[order], batch_generator(5, step, "finetune-mixup"))
        torch.testing.assert_close(inputs, mixed, rtol=0, atol=0)
        assert torch.equal(labels, mixed_y) and (labels == -1).sum() >= 30
        with torch.no_grad():
            torch.testing.assert_close(t_logits, small_teacher.model(mixed))
    seen.clear()
    finetune(copy.deepcopy(res.student), small_teacher.model, TensorDataset(x, y), steps=1,
             objectives=ObjectiveSet([MSE()]), batch_size=32, seed=5, mixup=False, progress=False)
    order = shuffled_batches(32, 32, batch_generator(5, 0, "finetune"), drop_last=True)[0]
    assert torch.equal(seen[0][0], x[order]) and torch.equal(seen[0][1], y[order])
    # shift and flip: each step's images moved by batch_generator(seed, t, "finetune-shift"), then mixed; the
    # teacher answers on what the student sees
    seen.clear()
    finetune(copy.deepcopy(res.student), small_teacher.model, TensorDataset(x, y), steps=2,
             objectives=ObjectiveSet([MSE()]), batch_size=32, seed=5, shift=2, flip=True, progress=False)
    for step, (inputs, labels, t_logits) in enumerate(seen):
        order = shuffled_batches(32, 32, batch_generator(5, step, "finetune"), drop_last=True)[0]
        moved = shift_flip_batch(x[order], batch_generator(5, step, "finetune-shift"), 2, True)
        assert not torch.equal(moved, x[order])
        mixed, mixed_y = mixup_batch(moved, y[order], batch_generator(5, step, "finetune-mixup"))
        torch.testing.assert_close(inputs, mixed, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(t_logits, small_teacher.model(mixed))


def test_finetune_qdrop_drops_with_its_seeded_masks_and_leaves_plain_quantizers(small_teacher):
    from torch.utils.data import TensorDataset

    res = run(small_teacher, QuantConfig(4, 4), a_method="mse")
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(16, dtype=torch.long)
    seen = []

    class Record(Objective):
        name = "record"

        def forward(self, batch):
            seen.append(batch.student_logits.detach().clone())
            return batch.student_logits.pow(2).mean()

    student = copy.deepcopy(res.student)
    finetune(student, small_teacher.model, TensorDataset(x, y), steps=1, objectives=ObjectiveSet([Record()]),
             batch_size=16, seed=2, mixup=False, drop_prob=0.5, progress=False)
    # the first step's student: each activation element quantized with probability 0.5, the masks drawn in forward
    # order from a generator seeded with batch_seed(seed, step, "finetune-qdrop")
    order = shuffled_batches(16, 16, batch_generator(2, 0, "finetune"), drop_last=True)[0]
    ref = copy.deepcopy(res.student)
    gen = torch.Generator().manual_seed(batch_seed(2, 0, "finetune-qdrop"))
    acts = [l.aq for _, l in quant_layers(ref) if l.aq is not None]
    for q in acts:
        q.drop_prob, q.drop_generator = 0.5, gen
    with torch.no_grad():
        expected = ref(x[order])
        for q in acts:
            q.drop_prob = 0.0
        plain = ref(x[order])
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    assert not torch.allclose(seen[0], plain, atol=1e-4)  # the masks changed the forward
    # afterwards every quantizer is plain again (QDrop would also drop in evaluation)
    assert all(l.aq.drop_prob == 0.0 and l.aq.drop_generator is None
               for _, l in quant_layers(student) if l.aq is not None)
    # called from Python, a probability outside (0, 1] is refused before anything runs, as the CLI refuses it
    for bad in (0.0, 1.5):
        with pytest.raises(ZkdError, match=r"drop_prob must be in \(0, 1\]"):
            finetune(student, small_teacher.model, TensorDataset(x, y), steps=1, drop_prob=bad, progress=False)


def test_reconstruction_draws_qdrop_masks_on_its_device_and_is_deterministic(small_teacher, monkeypatch):
    res = run(small_teacher, QuantConfig(4, 4), data="gaussian:32", num_images=32, holdout=0)
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    cfg = ReconConfig(iters=3, batch_size=8)
    calls = spy_rand(monkeypatch)
    students = []
    for _ in range(2):
        student = copy.deepcopy(res.student)
        reconstruct(student, res.fp_model, [x], torch.device("cpu"), cfg, seed=3, progress=False)
        students.append(student.state_dict())
    cpu = torch.device("cpu")
    # every mask (block inputs and each activation quantizer) drawn on the run's device with a generator there
    assert calls and all(c == (cpu, cpu) for c in calls), calls[:4]
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_reconstruction_reduces_block_loss(small_teacher):
    res = run(small_teacher, QuantConfig(3, 3), data="gaussian:64", num_images=64, holdout=0, a_method="mse")
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    hist = reconstruct(res.student, res.fp_model, [x[:32], x[32:]], torch.device("cpu"),
                       ReconConfig(iters=120, batch_size=16, lr_round=1e-2), seed=0, progress=False)
    assert [h["block"] for h in hist] == ["conv1", "layer1.0", "layer2.0", "layer3.0", "fc"]
    # learned rounding is never much worse than nearest rounding, and clearly better on most blocks
    assert all(h["loss_after"] <= h["loss_before"] * 1.01 for h in hist), hist
    assert sum(h["loss_after"] < 0.95 * h["loss_before"] for h in hist) >= 3, hist
    for _, layer in quant_layers(res.student):  # learned rounding left the weights on the grid
        assert layer.wq.adaround is None
        codes = layer.wq.quantize(layer.weight)
        torch.testing.assert_close(layer.wq(layer.weight),
                                   (codes - layer.wq._shaped(layer.wq.zero_point, layer.weight)) *
                                   layer.wq._shaped(layer.wq.scale.detach(), layer.weight))


@pytest.mark.parametrize("bits, expected", [((4, 4), True), ((3, 8), True), ((8, 4), True), ((8, 8), False),
                                            ((6, 6), False)])
def test_reconstruction_is_on_by_default_at_4_bits_or_fewer(small_teacher, bits, expected):
    assert recon_by_default(QuantConfig(*bits)) is expected
    if bits not in ((4, 4), (8, 8)):
        return
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, batch_size=16, candidates=5,
                              recon_iters=2, progress=False)
    res = calibrate_student(small_teacher, QuantConfig(*bits), opts, torch.device("cpu"))
    assert res.report["settings"]["recon"] is expected
    assert len(res.report["recon"]) == (len(find_blocks(res.student)) if expected else 0)
    assert RECON_DEFAULT_ITERS == CalibrationOptions(data="gaussian:1").recon_iters


def test_rounding_learning_rate_follows_the_schedule():
    # the papers' rate at the papers' schedule, scaled by 1 / sqrt(iters) elsewhere (closed forms)
    assert round_lr(PAPER_ITERS) == PAPER_LR_ROUND == 1e-3
    assert round_lr(100) == pytest.approx(1e-3 * 200 ** 0.5, rel=1e-12)
    assert round_lr(300) == pytest.approx(0.0081650, rel=1e-4)
    assert ReconConfig(iters=400).lr_round == pytest.approx(1e-3 * 50 ** 0.5, rel=1e-12)
    assert ReconConfig(iters=400, lr_round=3e-3).lr_round == 3e-3  # an explicit rate is kept
    assert ReconConfig.from_dict(ReconConfig(iters=50).to_dict()).lr_round == pytest.approx(0.02, rel=1e-12)
    assert CalibrationOptions(data="gaussian:1").recon_lr is None  # the CLI default defers to the rule


def bns_kl_by_hand(model: torch.nn.Module, x: torch.Tensor) -> float:
    """KL(N(running) || N(data)) per channel at every BN input (biased data variance, eps added to both), mean over
    channels, then over layers: the BNS score written out directly."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().double()))
             for i, m in enumerate(bns)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    per_layer = []
    for i, m in enumerate(bns):
        a = seen[i].transpose(0, 1).flatten(1)
        mu_d, var_d = a.mean(1), a.var(1, unbiased=False) + m.eps
        mu_t, var_t = m.running_mean.double(), m.running_var.double() + m.eps
        kl = 0.5 * torch.log(var_d / var_t) + (var_t + (mu_t - mu_d) ** 2) / (2 * var_d) - 0.5
        per_layer.append(float(kl.mean()))
    return sum(per_layer) / len(per_layer)


def matched_teacher(teacher: Teacher, x: torch.Tensor) -> Teacher:
    """A copy of ``teacher`` whose BN running statistics are those of ``x`` (one train-mode pass with a cumulative
    average): to it, ``x`` looks like its training data."""
    net = copy.deepcopy(teacher.model)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    net.eval().requires_grad_(False)
    return Teacher(net, teacher.spec, {"kind": "test"}, state_sha256(net))


@pytest.mark.parametrize("case", ["gaussian (far)", "matched (close)", "explicit --recon-lr"])
def test_rounding_rate_moves_the_variables_and_the_report_says_how_far_the_data_is(small_teacher, monkeypatch,
                                                                                     case):
    """One Adam step moves every rounding variable with a non-zero gradient by the rate (Adam's first step is
    ``lr * g / (|g| + eps)``), so the displacement measured on the student is the rate the run used: the schedule
    rule unless --recon-lr is given. The report's data score is the BNS divergence computed directly, with its
    verdict and, for far data, the advice."""
    starts, ends = [], []
    start, finish = FakeQuantizer.start_adaround, FakeQuantizer.finish_adaround

    def spy_start(self, w, learn_scale=False):
        start(self, w, learn_scale)
        starts.append(self.adaround.detach().clone())

    def spy_finish(self, weight):
        ends.append(self.adaround.detach().clone())
        finish(self, weight)

    monkeypatch.setattr(FakeQuantizer, "start_adaround", spy_start)
    monkeypatch.setattr(FakeQuantizer, "finish_adaround", spy_finish)
    lr = 4e-3 if case.startswith("explicit") else None
    opts = CalibrationOptions(data="gaussian:32", num_images=32, holdout=0, batch_size=16, candidates=20,
                              progress=False, a_method="mse", recon=True, recon_check=False, recon_iters=1,
                              recon_lambda=0.0, recon_lr=lr)
    ds = make_dataset("gaussian:32", small_teacher.spec, num_images=32, seed=0)  # the images the run draws
    images = torch.stack([ds[i][0] for i in range(32)])
    teacher = matched_teacher(small_teacher, images) if case.startswith("matched") else small_teacher
    res = calibrate_student(teacher, QuantConfig(4, 4), opts, torch.device("cpu"))
    rec = res.report["settings"]["reconstruction"]
    score = bns_kl_by_hand(teacher.model, images)
    assert rec["data_fit"]["score"] == pytest.approx(score, rel=1e-6)
    line = rounding_rate_line(res.report)
    if case.startswith("matched"):
        assert score < 1e-4 and rec["data_fit"]["verdict"] == "close to the training data"
        assert "--recon-lr 1e-3" not in line
    else:
        assert score > VERDICT_FAR and rec["data_fit"]["verdict"] == "far" and "--recon-lr 1e-3" in line
    expected = PAPER_LR_ROUND * PAPER_ITERS ** 0.5 if lr is None else lr  # sqrt(20000 / 1) at one step
    assert rec["lr_round"] == pytest.approx(expected, rel=1e-12)
    assert f"{expected:.3g}" in line
    assert len(starts) == len(ends) == len(quant_layers(res.student))
    moved = torch.cat([(e - s).abs().flatten() for s, e in zip(starts, ends)]) / expected
    # saturated h(V) (frac clipped at the grid ends) or dead inputs give no or tiny gradients; the rest move by lr
    assert float(moved.max()) == pytest.approx(1.0, abs=1e-4)
    assert float(torch.quantile(moved, 0.5)) == pytest.approx(1.0, abs=2e-3)
    assert float((moved > 0.9).float().mean()) > 0.6
