"""``zkd calibrate`` / ``zkd evaluate`` end to end on the shipped teacher, and every bad input: one-line error,
non-zero exit, no traceback, no output file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from zeroshot_kd import load_student
from zeroshot_kd.data import make_dataset
from zeroshot_kd.quant.modules import QuantConfig
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student
from zeroshot_kd.shards import FORMAT, FORMAT_VERSION, MANIFEST, shard_name, write_shard

FAST = ["--num-images", "32", "--holdout", "16", "--batch-size", "16", "--candidates", "20", "--recon-iters", "5",
        "--probe-iterations", "20", "--device", "cpu", "-q"]


def run(args):
    return CliRunner().invoke(cli, args)


def make_shards(root: Path, spec, teacher_dict: dict, n: int = 24, per_shard: int = 8, seed: int = 0) -> Path:
    """A minimal ``zkd synthesize``-style folder: shards of random normalized images and a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for i in range(0, n, per_shard):
        x = spec.clamp(torch.randn(per_shard, *spec.shape, generator=g))
        labels = [(i + j) % spec.num_classes for j in range(per_shard)]
        keys = [f"s{i + j:06d}" for j in range(per_shard)]
        sha = write_shard(root / shard_name(i // per_shard), keys, x, labels, spec)
        entries.append({"file": shard_name(i // per_shard), "count": per_shard, "sha256": sha})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "teacher": teacher_dict,
                "input_spec": spec.to_dict(), "num_images": n, "shards": entries}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def assert_clean_error(r, message: str, folder: Path) -> None:
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("zkd: error:")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output
    assert not list(folder.glob("*.pt")) and not list(folder.glob(".*tmp*")) and not (folder / "report.json").exists()


def test_w8a8_ptq_agrees_with_teacher_on_real_test_images(teacher):
    config = QuantConfig(8, 8)
    opts = CalibrationOptions("fashion-mnist:train", num_images=256, holdout=0, candidates=50,
                              eval_data="fashion-mnist:test", eval_images=2000, progress=False)
    res = calibrate_student(teacher, config, opts, torch.device("cpu"))
    ev = res.report["eval"]
    assert ev["student"]["images"] == 2000
    assert ev["student"]["agreement"] > 99.0, ev
    assert abs(ev["student"]["top1"] - ev["teacher"]["top1"]) < 1.0
    by_name = {r["layer"]: r for r in res.report["layers"]}
    assert by_name["conv1"]["a_bits"] is None and by_name["fc"]["a_bits"] == 8
    assert all(r["w_sqnr_db"] > 30 for r in res.report["layers"])  # 8-bit weights: ~6 dB/bit


def test_calibrate_and_evaluate_cli(tmp_path, teacher):
    out = tmp_path / "w4a4.pt"
    r = run(["calibrate", "--data", "fashion-mnist:train", "--bits", "4", "--recon", "--recon-iters", "3",
             "--finetune-steps", "2", "--check-tolerance", "0.5", "--out", str(out), "--json", *FAST])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["w_bits"] == 4 and summary["calibration_images"] == 32 and "first layer W8" in summary["convention"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["heldout_images"] == 16 and report["heldout_is_separate"]
    assert {r["layer"] for r in report["layers"]} >= {"conv1", "layer1.0.conv1", "fc"}
    assert len(report["recon"]) == 8 and report["finetune"][-1]["step"] == 2
    md = (tmp_path / "report.md").read_text()
    assert "Convention:" in md and "W SQNR dB" in md and "| layer1.0.conv1 |" in md
    for check, (before, after), labels in ((report["recon_check"], ("ptq_kl", "recon_kl"), ("ptq", "reconstruction")),
                                           (report["finetune_check"], ("before_kl", "finetune_kl"),
                                            ("before", "finetune"))):
        assert check["tolerance_se"] == 0.5  # --check-tolerance reaches both checks
        assert check["kept"] == labels[int(check[after] - check[before] <= 0.5 * check["se"])]
    assert "tolerance 0.5 SE): kept the" in md

    r = run(["evaluate", "--model", str(out), "--data", "fashion-mnist:test", "--num-images", "300",
             "--teacher", "fmnist_resnet14", "--device", "cpu", "-q", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # independent computation: reload the student and count
    student = load_student(out)
    ds = make_dataset("fashion-mnist:test", teacher.spec, num_images=300)
    x = torch.stack([ds[i][0] for i in range(300)])
    y = torch.tensor([int(ds[i][1]) for i in range(300)])
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher.model(x)
    assert res["images"] == 300
    assert res["top1"] == pytest.approx(100.0 * (s_logits.argmax(1) == y).float().mean().item())
    top5 = (s_logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert res["top5"] == pytest.approx(100.0 * top5)
    assert res["agreement"] == pytest.approx(100.0 * (s_logits.argmax(1) == t_logits.argmax(1)).float().mean().item())

    r = run(["evaluate", "--model", "fmnist_resnet14", "--data", "fashion-mnist:test", "--num-images", "300",
             "--device", "cpu", "-q", "--json"])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["kind"] == "teacher"
    assert res["top1"] == pytest.approx(100.0 * (t_logits.argmax(1) == y).float().mean().item())


def test_calibrate_same_seed_same_bytes(tmp_path, teacher):
    outs = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        r = run(["calibrate", "--data", "gaussian:48", "--bits", "4", "--finetune-steps", "2", "--seed", "3",
                 "--out", str(d / "s.pt"), *FAST])
        assert r.exit_code == 0, r.output
        outs.append((d / "s.pt").read_bytes())
    assert outs[0] == outs[1]


def test_shards_calibrate(tmp_path, teacher):
    shards = make_shards(tmp_path / "synth", teacher.spec, teacher.to_dict(), n=48)
    r = run(["calibrate", "--data", str(shards), "--bits", "4", "--out", str(tmp_path / "s.pt"), "--json", *FAST])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["calibration_images"] == 32


@pytest.mark.parametrize("case", ["bits", "w_bits", "empty", "corrupt", "other_teacher", "other_spec", "missing_dir",
                                  "missing_folder", "keep8"])
def test_calibrate_bad_input(tmp_path, teacher, case):
    work = tmp_path / "work"
    work.mkdir()
    data = "fashion-mnist:train"
    extra: list[str] = []
    message = ""
    if case == "bits":
        extra, message = ["--bits", "9"], "--bits 9 is outside 2..8"
    elif case == "w_bits":
        extra, message = ["--w-bits", "1"], "--w-bits 1 is outside 2..8"
    elif case == "keep8":
        extra, message = ["--keep-8bit", "middle"], "unknown --keep-8bit entry"
    elif case == "empty":
        root = tmp_path / "empty"
        root.mkdir()
        (root / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                 "teacher": teacher.to_dict(), "input_spec": teacher.spec.to_dict(),
                                                 "shards": []}))
        data, message = str(root), "is empty"
    elif case == "corrupt":
        root = make_shards(tmp_path / "bad", teacher.spec, teacher.to_dict())
        p = root / shard_name(1)
        p.write_bytes(p.read_bytes()[:1000])
        data, message = f"shards:{root}", "shard-000001.tar"
    elif case == "other_teacher":
        other = {**teacher.to_dict(), "weights_sha256": "0" * 64}
        data, message = str(make_shards(tmp_path / "other", teacher.spec, other)), "another teacher"
    elif case == "other_spec":
        from zeroshot_kd.spec import InputSpec

        spec = InputSpec(1, 28, (0.5,), (0.5,), 10)
        data, message = str(make_shards(tmp_path / "spec", spec, teacher.to_dict())), "were made for input"
    elif case == "missing_dir":
        data, message = str(tmp_path / "nowhere"), "does not exist"
    elif case == "missing_folder":
        data, message = f"folder:{tmp_path / 'nowhere'}", "does not exist"
    r = run(["calibrate", "--data", data, "--out", str(work / "s.pt"), *FAST, *extra])
    assert_clean_error(r, message, work)


def test_evaluate_bad_input(tmp_path, teacher):
    opts = CalibrationOptions("gaussian:16", num_images=16, holdout=0, probe_iterations=20, candidates=5,
                              progress=False)
    res = calibrate_student(teacher, QuantConfig(8, 8), opts, torch.device("cpu"))
    from zeroshot_kd.quant.student import architecture_record, save_student

    path = tmp_path / "s.pt"
    save_student(path, res.student, QuantConfig(8, 8), res.layers, teacher, res.folded, architecture_record(teacher))
    obj = torch.load(path, weights_only=True)
    obj["format_version"] = 99
    torch.save(obj, tmp_path / "v99.pt")
    r = run(["evaluate", "--model", str(tmp_path / "v99.pt"), "--data", "gaussian:4", "--device", "cpu", "-q"])
    assert_clean_error(r, "unknown student format version 99", tmp_path / "none")
    r = run(["evaluate", "--model", str(path), "--data", f"folder:{tmp_path / 'nope'}", "--device", "cpu", "-q"])
    assert_clean_error(r, "does not exist", tmp_path / "none")


def test_calibrate_objectives_wired_into_finetuning(tmp_path):
    out = tmp_path / "s.pt"
    r = run(["calibrate", "--data", "fashion-mnist:train", "--bits", "4", "--finetune-steps", "3", "--objective",
             "kd:T=4", "--objective", "rkd:weight=1", "--out", str(out), "--json", *FAST])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["finetune_loss"] == "kd:T=4 + rkd:weight=1"
    terms = report["finetune"][-1]
    assert {"kd", "rkd"} <= set(terms), terms
    bad = tmp_path / "bad"
    bad.mkdir()
    r = run(["calibrate", "--data", "fashion-mnist:train", "--finetune-steps", "3", "--objective", "nope",
             "--out", str(bad / "s.pt"), *FAST])
    assert_clean_error(r, "nope", bad)
