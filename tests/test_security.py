"""Builders named inside files are never imported or called unless the user opts in (issue 10).

A malicious card or student record names ``os:system`` with a command that would create a marker file; every entry
point must refuse it with one line and the marker must never appear. With the opt-in, a harmless callable named in a
file is called (and a warning names it).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from zeroshot_kd import ZkdError, load_student, load_teacher
from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.modelspec import UntrustedBuilderWarning


def _malicious_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), ckpt)
    card = {"architecture": {"builder": "os:system", "command": f"touch {marker}"},
            "input_spec": FASHION_MNIST_SPEC.to_dict()}
    (tmp_path / "evil.json").write_text(json.dumps(card))
    return ckpt, marker


def _one_line_refusal(result, marker):
    assert result.exit_code != 0
    err = result.output.strip().splitlines()
    assert len(err) == 1 and "os:system" in err[0] and "--trust-builders" in err[0], result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


def test_load_teacher_refuses_a_card_naming_os_system(tmp_path):
    ckpt, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(ZkdError, match="os:system.*allow-list"):
        load_teacher(str(ckpt))
    assert not marker.exists()


@pytest.mark.parametrize("args", [
    ["evaluate", "--model", "{ckpt}", "--data", "gaussian:4"],
    ["similarity", "--teacher", "{ckpt}", "--data", "g=gaussian:4", "--out", "{tmp}/sim"],
    ["distill", "--student", "{ckpt}", "--data", "gaussian:4", "--out", "{tmp}/s.pt"],
    ["synthesize", "--teacher", "{ckpt}", "--num-images", "2", "--out", "{tmp}/syn"],
])
def test_cli_entry_points_refuse_malicious_cards(tmp_path, args):
    ckpt, marker = _malicious_checkpoint(tmp_path)
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in args]
    _one_line_refusal(CliRunner().invoke(cli, argv), marker)


def test_load_student_refuses_a_record_naming_os_system(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "student.pt"
    torch.save({"format": "zkd-student", "format_version": 2, "config": {}, "teacher": {}, "folded": [],
                "layers": {}, "codes": {}, "state": {}, "calibration": {},
                "architecture": {"builder": "os:system", "kwargs": {"command": f"touch {marker}"}}}, path)
    with pytest.raises(ZkdError, match="os:system"):
        load_student(path)
    _one_line_refusal(CliRunner().invoke(cli, ["evaluate", "--model", str(path), "--data", "gaussian:4"]), marker)


def test_opt_in_calls_the_named_builder_with_a_warning(tmp_path):
    lin = torch.nn.Linear(4, 3)
    ckpt = tmp_path / "lin.pt"
    torch.save(lin.state_dict(), ckpt)
    card = {"architecture": {"builder": "torch.nn:Linear", "in_features": 4, "out_features": 3},
            "input_spec": FASHION_MNIST_SPEC.to_dict()}
    (tmp_path / "lin.json").write_text(json.dumps(card))
    with pytest.raises(ZkdError, match="torch.nn:Linear"):
        load_teacher(str(ckpt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = load_teacher(str(ckpt), trust_builders=True)
    assert any(issubclass(w.category, UntrustedBuilderWarning) and "torch.nn:Linear" in str(w.message) for w in caught)
    x = torch.randn(5, 4)
    assert torch.equal(t.model(x), lin(x))


def test_a_builder_typed_by_the_user_stays_allowed():
    t = load_teacher("torch.nn:Identity", num_classes=None, channels=1, mean=[0.5], std=[0.5])
    x = torch.randn(2, 3)
    assert torch.equal(t.model(x), x)
