"""Dataset similarity from BN statistics: streaming moments, closed-form KL, signatures, ordering, CLI errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

from zeroshot_kd.bn import bn_layers
from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.models import cifar_resnet
from zeroshot_kd.similarity import (DIVERGENCES, HEADLINE, MomentAccumulator, Signature, TransformedDataset,
                                    compute_signature, dataset_distance, divergences, load_signatures,
                                    make_similarity_dataset, parse_transforms, save_signatures, similarity_matrix,
                                    similarity_report, spearman, teacher_signature, write_report)
from zeroshot_kd.teachers import Teacher, builtin_teachers, load_teacher, state_sha256

SPEC = FASHION_MNIST_SPEC


def small_teacher(seed: int = 0) -> Teacher:
    """A random ResNet-8 (width 4) whose BN running statistics are set to non-trivial values."""
    torch.manual_seed(seed)
    model = cifar_resnet(8, 4)
    for _, bn in bn_layers(model):
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval().requires_grad_(False)
    return Teacher(model, SPEC, {"kind": "test", "spec": f"resnet8-seed{seed}"}, state_sha256(model))


def images(n: int, seed: int = 0, offset: float = 0.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *SPEC.shape, generator=g) * 0.8 + offset, torch.zeros(n, dtype=torch.long))


def bn_inputs(teacher: Teacher, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every BN layer for one forward pass on all of ``x`` (the one-shot reference)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [bn.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach().clone()))
               for n, bn in bn_layers(teacher.model)]
    with torch.no_grad():
        teacher.model(x)
    for h in handles:
        h.remove()
    return seen


def hand_signature(name: str, means: list[list[float]], variances: list[list[float]], sha: str = "t",
                   eps: float = 0.0) -> Signature:
    return Signature(name, [f"bn{i}" for i in range(len(means))],
                     [torch.tensor(m, dtype=torch.float64) for m in means],
                     [torch.tensor(v, dtype=torch.float64) for v in variances], [eps] * len(means), sha)


# ----------------------------------------------------------------------------------------------- streaming moments


@pytest.mark.parametrize("chunks", [[1] * 40, [7, 7, 7, 7, 7, 5], [40], [3, 30, 7]])
def test_moment_accumulator_equals_one_shot_float64(chunks):
    g = torch.Generator().manual_seed(1)
    # Large offset, small spread: a float32 sum of x and x^2 would lose every digit of the variance.
    x = (1e4 + 0.1 * torch.randn(40, 3, 5, 5, generator=g, dtype=torch.float64)).float()
    acc = MomentAccumulator(3)
    start = 0
    for c in chunks:
        acc.update(x[start:start + c])
        start += c
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert acc.count == 40 * 25
    torch.testing.assert_close(acc.mean, mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(acc.var, var, rtol=1e-9, atol=0)
    naive = (x.pow(2).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)).pow(2)).double()  # float32 E[x^2]-E[x]^2
    assert (naive - var).abs().max() > 100 * (acc.var - var).abs().max()


def test_moment_accumulator_chunks_inside_a_batch(monkeypatch):
    import zeroshot_kd.similarity.signature as sim

    monkeypatch.setattr(sim, "_CHUNK_ELEMENTS", 2 * 3 * 4 * 4)  # force 2-image chunks inside one update
    x = torch.randn(9, 3, 4, 4)
    acc = MomentAccumulator(3)
    n, mean_b, m2_b = acc.update(x)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert n == 9 * 16
    torch.testing.assert_close(mean_b, mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(m2_b / n, var, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batch_size", [1, 6, 20])
def test_signature_equals_one_shot_statistics_whatever_the_batch_size(batch_size):
    teacher = small_teacher()
    ds = images(20)
    sig = compute_signature(teacher, ds, "d", batch_size=batch_size)
    ref = bn_inputs(teacher, ds.tensors[0])
    assert sig.count == 20 and sig.mode == "exact" and sig.layers == [n for n, _ in bn_layers(teacher.model)]
    for name, m, v in zip(sig.layers, sig.mean, sig.var):
        var, mean = torch.var_mean(ref[name].double(), dim=(0, 2, 3), correction=0)
        # Activations are float32 (conv kernels may differ with the batch size); the accumulation adds nothing.
        torch.testing.assert_close(m, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, var, rtol=1e-5, atol=1e-6)


def test_per_batch_statistics_average_full_batches():
    teacher = small_teacher()
    ds = images(25, seed=3)
    sig = compute_signature(teacher, ds, "d", batch_size=10, per_batch=True)
    assert sig.mode == "per-batch" and sig.num_batches == 2  # the last 5 images are a partial batch: dropped
    x = ds.tensors[0]
    first, second = bn_inputs(teacher, x[:10]), bn_inputs(teacher, x[10:20])
    for name, m, v in zip(sig.layers, sig.mean, sig.var):
        (v1, m1), (v2, m2) = (torch.var_mean(b[name].double(), dim=(0, 2, 3), correction=0) for b in (first, second))
        torch.testing.assert_close(m, (m1 + m2) / 2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, (v1 + v2) / 2, rtol=1e-5, atol=1e-6)
    # Two equal halves: whole-data variance = mean within-batch variance + ((m1 - m2) / 2)^2.
    exact = compute_signature(teacher, torch.utils.data.Subset(ds, range(20)), "d20", batch_size=10)
    for name, m, v, ve in zip(sig.layers, sig.mean, sig.var, exact.var):
        (v1, m1), (v2, m2) = (torch.var_mean(b[name].double(), dim=(0, 2, 3), correction=0) for b in (first, second))
        torch.testing.assert_close(ve, v + ((m1 - m2) / 2) ** 2, rtol=1e-5, atol=1e-6)


def test_teacher_signature_is_running_statistics():
    teacher = small_teacher()
    sig = teacher_signature(teacher)
    for (name, bn), m, v, e in zip(bn_layers(teacher.model), sig.mean, sig.var, sig.eps):
        assert torch.equal(m, bn.running_mean.double()) and torch.equal(v, bn.running_var.double()) and e == bn.eps


# ----------------------------------------------------------------------------------------------- divergences


def test_divergences_are_zero_for_identical_gaussians():
    t = hand_signature("teacher", [[0.5, -1.0], [2.0]], [[1.0, 3.0], [0.25]], eps=1e-5)
    d = divergences(t, hand_signature("same", [[0.5, -1.0], [2.0]], [[1.0, 3.0], [0.25]], eps=1e-5))
    assert set(d["scores"]) == set(DIVERGENCES) and HEADLINE == "bns"
    for k in DIVERGENCES:
        assert d["scores"][k] == pytest.approx(0.0, abs=1e-15)
        assert d["per_layer"][k] == pytest.approx([0.0, 0.0], abs=1e-15)


def test_divergences_closed_form_mean_shift_and_variance_ratio():
    # Layer 0: unit variances, means shifted by 1 and 3 -> KL = shift^2 / 2 both ways; l2 = ||shift||_2.
    # Layer 1: same means, data variance 4x the teacher's -> KL(N(0,1)||N(0,4)) = log 2 + 1/8 - 1/2,
    #          reverse KL(N(0,4)||N(0,1)) = -log 2 + 2 - 1/2, l2 = ||4 - 1||_2 over 2 channels.
    t = hand_signature("teacher", [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]])
    d = hand_signature("data", [[1.0, 3.0], [0.0, 0.0]], [[1.0, 1.0], [4.0, 4.0]])
    out = divergences(t, d)
    fwd1, rev1 = math.log(2) + 1 / 8 - 0.5, -math.log(2) + 2 - 0.5
    assert out["per_layer"]["bns"] == pytest.approx([(0.5 + 4.5) / 2, fwd1])
    assert out["per_layer"]["reverse"] == pytest.approx([2.5, rev1])
    assert out["per_layer"]["symmetric"] == pytest.approx([2.5, (fwd1 + rev1) / 2])
    assert out["per_layer"]["l2"] == pytest.approx([math.sqrt(10), 3 * math.sqrt(2)])
    assert out["scores"]["bns"] == pytest.approx((2.5 + fwd1) / 2)
    # The distance between datasets is the symmetric form, averaged the same way, and symmetric in its arguments.
    assert dataset_distance(t, d) == pytest.approx((2.5 + (fwd1 + rev1) / 2) / 2)
    assert dataset_distance(d, t) == pytest.approx(dataset_distance(t, d))


def test_eps_is_added_to_both_variances():
    eps = 0.5
    t = hand_signature("teacher", [[0.0]], [[1.0 - eps]], eps=eps)  # var + eps = 1
    d = hand_signature("data", [[0.0]], [[4.0 - eps]], eps=eps)  # var + eps = 4
    assert divergences(t, d)["scores"]["bns"] == pytest.approx(math.log(2) + 1 / 8 - 0.5)


def test_similarity_matrix_is_symmetric_with_zero_diagonal():
    sigs = [hand_signature(f"s{i}", [[float(i)]], [[1.0 + i]]) for i in range(3)]
    m = similarity_matrix(sigs)
    for i in range(3):
        assert m[i][i] == 0
        for j in range(3):
            assert m[i][j] == pytest.approx(m[j][i])
            if i != j:
                assert m[i][j] == pytest.approx(dataset_distance(sigs[i], sigs[j])) and m[i][j] > 0


def test_spearman():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    # Ties: average ranks [1.5, 1.5, 3] vs [1, 2, 3] -> Pearson of ranks.
    rx, ry = [1.5, 1.5, 3], [1, 2, 3]
    mx, my = sum(rx) / 3, 2
    expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([5, 5, 9], [0.1, 0.2, 0.3]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1], [1, 2]))


# ----------------------------------------------------------------------------------------------- signatures on disk


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_saved_signatures_give_identical_scores(tmp_path, suffix):
    teacher = small_teacher()
    sigs = [compute_signature(teacher, images(20, seed=s, offset=0.3 * s), f"d{s}", source=f"test:{s}", batch_size=8)
            for s in range(2)]
    before = similarity_report(teacher, sigs)
    path = tmp_path / f"stats{suffix}"
    save_signatures(path, sigs)
    loaded = load_signatures(path, teacher=teacher)
    assert [s.name for s in loaded] == ["d0", "d1"] and [s.source for s in loaded] == ["test:0", "test:1"]
    for a, b in zip(sigs, loaded):
        assert all(torch.equal(x, y) for x, y in zip(a.mean + a.var, b.mean + b.var))
        assert (a.count, a.mode, a.layers, a.eps) == (b.count, b.mode, b.layers, b.eps)
    after = similarity_report(teacher, loaded)
    assert after["datasets"] == before["datasets"] and after["matrix"] == before["matrix"]


def test_signatures_from_another_teacher_are_refused(tmp_path):
    teacher, other = small_teacher(0), small_teacher(1)
    sig = compute_signature(other, images(8), "d", batch_size=8)
    path = tmp_path / "s.json"
    save_signatures(path, [sig])
    with pytest.raises(ZkdError, match="not with this --teacher") as e:
        load_signatures(path, teacher=teacher)
    assert "\n" not in str(e.value)
    with pytest.raises(ZkdError, match="another teacher"):
        similarity_report(teacher, [sig])
    with pytest.raises(ZkdError, match="different teachers"):
        dataset_distance(teacher_signature(teacher), sig)


def test_bad_stats_files(tmp_path):
    teacher = small_teacher()
    with pytest.raises(ZkdError, match="does not exist"):
        load_signatures(tmp_path / "missing.json", teacher)
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ZkdError, match="not a zkd signature file"):
        load_signatures(tmp_path / "x.json", teacher)
    (tmp_path / "y.json").write_text('{"truncated": ')
    with pytest.raises(ZkdError, match="not valid JSON"):
        load_signatures(tmp_path / "y.json", teacher)


# ----------------------------------------------------------------------------------------------- bad input


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(ZkdError, match="'nothing'.*is empty") as e:
        compute_signature(small_teacher(), TensorDataset(torch.zeros(0, *SPEC.shape)), "nothing")
    assert "\n" not in str(e.value)


def test_teacher_without_batchnorm_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, *SPEC.shape))
    teacher = Teacher(model.eval(), SPEC, {}, state_sha256(model))
    for call in (lambda: compute_signature(teacher, images(4), "d"), lambda: teacher_signature(teacher)):
        with pytest.raises(ZkdError, match="needs a teacher with BatchNorm") as e:
            call()
        assert "\n" not in str(e.value)


def test_wrong_image_shape_is_a_clear_error():
    ds = TensorDataset(torch.zeros(4, 3, 32, 32))
    with pytest.raises(ZkdError, match=r"shape \(3, 32, 32\).*expects \(1, 28, 28\)"):
        compute_signature(small_teacher(), ds, "rgb")


def test_transforms():
    assert parse_transforms("rot90, invert") == ["rot90", "invert"]
    with pytest.raises(ZkdError, match="unknown transform 'blur'"):
        parse_transforms("blur")
    pixels = torch.rand(3, *SPEC.shape)
    base = TensorDataset(SPEC.normalize(pixels), torch.arange(3))
    inv = TransformedDataset(base, ["invert"], SPEC)
    x, y = inv[1]
    torch.testing.assert_close(x, SPEC.normalize(1 - pixels[1:2])[0])
    assert y == 1
    rot = TransformedDataset(base, ["rot90"], SPEC)[0][0]
    # rot90 counter-clockwise: new[i][j] = old[j][W-1-i].
    assert rot[0, 0, 0] == base[0][0][0, 0, 27] and rot[0, 27, 0] == base[0][0][0, 0, 0]


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    from cli.similarity import command

    runner = CliRunner()
    result = runner.invoke(command, ["--teacher", "torch.nn:Identity", "--data", "g=gaussian:4"])
    assert result.exit_code == 2
    assert "zkd: error: similarity needs a teacher with BatchNorm" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    result = runner.invoke(command, ["--data", "g=gaussian:4", "--transform", "h=invert"])
    assert result.exit_code == 2 and "no --data entry is named 'h'" in result.output
    result = runner.invoke(command, [])
    assert result.exit_code == 2 and "nothing to compare" in result.output


# ----------------------------------------------------------------------------------------------- the shipped teacher

needs_teacher = pytest.mark.skipif("fmnist_resnet14" not in builtin_teachers(),
                                   reason="the shipped teacher assets/fmnist_resnet14.pt is not there yet")


@pytest.fixture(scope="module")
def shipped():
    return load_teacher()


@needs_teacher
def test_real_data_is_closest_noise_and_shifted_data_far(shipped):
    n = 128
    sources = {"train": ("fashion-mnist:train", []), "test": ("fashion-mnist:test", []),
               "noise": (f"gaussian:{n}", []), "inverted": ("fashion-mnist:test", ["invert"]),
               "rotated": ("fashion-mnist:test", ["rot90"])}
    sigs = [compute_signature(shipped, make_similarity_dataset(src, shipped.spec, n, tf), name, batch_size=128)
            for name, (src, tf) in sources.items()]
    report = similarity_report(shipped, sigs)
    score = {e["name"]: e["scores"][HEADLINE] for e in report["datasets"]}
    assert max(score["train"], score["test"]) < min(score["noise"], score["inverted"], score["rotated"])
    assert {e["name"] for e in report["datasets"][:2]} == {"train", "test"}
    # Real train and test are also close to each other, far from noise, in the dataset-to-dataset matrix.
    names = report["matrix"]["names"]
    m = report["matrix"]["values"]
    i, j, k = names.index("train"), names.index("test"), names.index("noise")
    assert m[i][j] < m[i][k] and m[i][j] < m[j][k]


@needs_teacher
def test_bn_matching_synthesis_is_closer_than_inception(shipped, tmp_path):
    from zeroshot_kd.synthesis import synthesize  # an ImportError is a failure, not a skip
    scores = {}
    for method in ("bns", "deepinversion", "inception"):
        out = tmp_path / method
        synthesize(out, teacher=shipped, method=method, num_images=8, batch_size=8, iterations=20, device="cpu",
                   progress=False)
        ds = make_similarity_dataset(str(out), shipped.spec)
        sig = compute_signature(shipped, ds, method)
        scores[method] = divergences(teacher_signature(shipped), sig)["scores"][HEADLINE]
    assert max(scores["bns"], scores["deepinversion"]) < scores["inception"]


@needs_teacher
def test_cli_end_to_end_with_saved_stats(shipped, tmp_path):
    from cli.similarity import command

    runner = CliRunner()
    out = tmp_path / "sim"
    args = ["--data", "test=fashion-mnist:test", "--data", "inv=fashion-mnist:test", "--transform", "inv=invert",
            "--data", "noise=gaussian:64", "--num-images", "64", "--batch-size", "32", "--quiet", "--json",
            "--out", str(out), "--save-stats", str(tmp_path / "s.pt")]
    result = runner.invoke(command, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [e["rank"] for e in summary["datasets"]] == [1, 2, 3] and summary["datasets"][0]["name"] == "test"
    written = json.loads((out / "similarity.json").read_text())
    assert written["datasets"] == summary["datasets"]
    md = (out / "similarity.md").read_text()
    assert all(n in md for n in ("test", "inv", "noise"))
    from PIL import Image

    assert Image.open(out / "similarity.png").size[0] > 300
    # The saved signatures, compared later without the data, give the same scores.
    again = runner.invoke(command, ["--stats", str(tmp_path / "s.pt"), "--quiet", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["datasets"] == summary["datasets"]


def test_write_report_files(tmp_path):
    teacher = small_teacher()
    sigs = [compute_signature(teacher, images(16, seed=s, offset=s), f"d{s}", batch_size=16) for s in range(2)]
    report = similarity_report(teacher, sigs)
    paths = write_report(report, tmp_path / "r")
    assert json.loads(paths["json"].read_text())["datasets"][0]["name"] == report["datasets"][0]["name"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["similarity.json", "similarity.md", "similarity.png"]
    with pytest.raises(ZkdError, match="used more than once"):
        similarity_report(teacher, [sigs[0], sigs[0]])
