"""zkd distill --assistant / --recipe active-mixup: argument errors (one line, exit 2) and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from zeroshot_kd.teachers import builtin_teachers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("args, needle", [
    (["--student", "resnet18", "--assistant", "wider-of-student"], "wider-of-student is undefined for --student "
                                                                    "resnet18"),
    (["--student", "cifar-resnet:8x2", "--resume"], "--resume restarts a chain"),
    (["--student", "cifar-resnet:8x2", "--assistant", "cifar-resnet:8x4", "--recipe", "active-mixup"],
     "does not combine with --recipe active-mixup"),
    (["--student", "cifar-resnet:8x2", "--recipe", "active-mixup", "--objective", "rkd"], "drop --objective"),
    (["--student", "cifar-resnet:8x2", "--assistant", "cifar-resnet:8x4", "--student-weights", "x.pt"],
     "do not apply to a chain"),
])
def test_recipe_argument_errors(tmp_path, args, needle):
    res = CliRunner().invoke(cli, ["distill", *args, "--data", "gaussian:4", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif("fmnist_resnet14" not in builtin_teachers(), reason="the shipped teacher is not built")
def test_active_mixup_cli_reports_every_round_and_the_queries(tmp_path):
    out = tmp_path / "s.pt"
    res = CliRunner().invoke(cli, ["distill", "--recipe", "active-mixup", "--student", "cifar-resnet:8x2", "--data",
                                   "fashion-mnist:train", "--num-images", "16", "--query-budget", "7", "--rounds",
                                   "2", "--epochs", "1", "--batch-size", "8", "--eval-data", "fashion-mnist:test",
                                   "--eval-images", "16", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    rounds = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["round"], r["queries"], r["train_images"]) for r in rounds] == [(0, 16, 16), (1, 20, 20), (2, 23, 23)]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["queries"] == 23 and card["test_accuracy"] == rounds[-1]["eval"]["top1"]
    assert "23 teacher queries (16 originals + 7 mixups)" in res.output
