"""The one config convention (zeroshot_kd/config.py): round trips, one-line errors, options generated from fields."""

from __future__ import annotations

import dataclasses
import json
import warnings

import click
import pytest
from click.testing import CliRunner

from zeroshot_kd.config import Config, OptionSpec, option, option_fields
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.quant.modules import QuantConfig
from zeroshot_kd.quant.pipeline import CalibrationOptions
from zeroshot_kd.quant.recon import ReconConfig
from zeroshot_kd.synthesis import METHODS
from zeroshot_kd.synthesis.adi import AdaptiveConfig
from zeroshot_kd.synthesis.engine import SynthesisConfig
from zeroshot_kd.training import TrainConfig

NON_DEFAULT = [
    TrainConfig(epochs=3, steps=7, batch_size=16, lr=0.1, optimizer="adam", weight_decay=0.0, schedule="constant",
                seed=5, precision="bf16", log_every=2, freeze_bn=True, objective_lr=0.01),
    QuantConfig(3, 6, True, ("last",), False),
    CalibrationOptions("gaussian:8", num_images=8, holdout=0, eval_data="fashion-mnist:test", batch_size=4,
                       a_method="mse", recon=True, recon_drop=1.0, equalize=True, mixed_precision=True,
                       size_budget="0.1x", scale_lr=1e-4, seed=3),
    ReconConfig(iters=5, batch_size=8, drop_prob=1.0, reg=0.1, beta=(10.0, 1.0), warmup=0.0, lr_round=1e-2,
                mode="genie", lr_w_scale=1e-3, time_floor=2),
    AdaptiveConfig(rounds=3, distill_steps=4, objectives=("kd", "rkd"), lr=0.1, batch_size=8, optimizer="adam",
                   weight_decay=0.0, schedule="constant"),
    SynthesisConfig("bns", 10, 4, 2, "3,7", METHODS["bns"].hyperparameters({"iterations": 3}), "bf16"),
]


@pytest.mark.parametrize("cfg", NON_DEFAULT, ids=lambda c: type(c).__name__)
def test_round_trip_through_json(cfg):
    """to_dict is plain JSON; from_dict gives back an equal object (tuples restored), every field non-default."""
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    back = type(cfg).from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.to_dict() == d


def test_to_dict_values_and_the_manifest_key_order():
    assert QuantConfig(3, 6, True, ("last",), False).to_dict() == {
        "w_bits": 3, "a_bits": 6, "w_asym": True, "keep_8bit": ["last"], "fold_bn": False}
    assert ReconConfig().to_dict()["beta"] == [20.0, 2.0]
    d = NON_DEFAULT[-1].to_dict()
    assert list(d) == ["method", "num_images", "batch_size", "seed", "targets", "precision", "hyperparameters"]
    assert d["hyperparameters"]["betas"] == [0.5, 0.9] and d["hyperparameters"]["iterations"] == 3


def test_older_records_take_defaults_and_unknown_keys_are_refused_or_warned():
    assert ReconConfig.from_dict({"iters": 9}) == ReconConfig(iters=9)
    assert CalibrationOptions.from_dict({"data": "gaussian:4"}) == CalibrationOptions("gaussian:4")
    with pytest.raises(ZkdError, match="unknown reconstruction option.*itters"):
        ReconConfig.from_dict({"itters": 9})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ReconConfig.from_dict({"iters": 9, "newer": 1}, strict=False) == ReconConfig(iters=9)
    assert len(w) == 1 and "newer" in str(w[0].message)
    with pytest.raises(ZkdError, match="missing option 'data'"):
        CalibrationOptions.from_dict({})
    with pytest.raises(ZkdError, match="expected a JSON object"):
        TrainConfig.from_dict([1, 2])


BAD = [
    (lambda: TrainConfig(optimizer="lbfgs"), "unknown optimizer 'lbfgs'"),
    (lambda: TrainConfig(lr=0.0), "--lr must be > 0"),
    (lambda: QuantConfig(9, 4), "bits must be an integer in 2..8"),
    (lambda: CalibrationOptions("gaussian:4", recon_drop=0.0), "--recon-drop must be > 0, got 0.0"),
    (lambda: CalibrationOptions("gaussian:4", finetune_drop=1.5), "--finetune-drop must be <= 1, got 1.5"),
    (lambda: CalibrationOptions("gaussian:4", finetune_shift=-2), "--finetune-shift must be >= 0, got -2"),
    (lambda: CalibrationOptions("gaussian:4", percentile=100.5), "--percentile must be <= 100, got 100.5"),
    (lambda: CalibrationOptions("gaussian:4", w_method="l3"), "unknown --w-method 'l3'; use one of lp, mse, minmax"),
    (lambda: CalibrationOptions("gaussian:4", lr=float("nan")), "--lr must be a finite number"),
    (lambda: CalibrationOptions("gaussian:4", size_budget="1MB"), "--size-budget needs --mixed-precision"),
    (lambda: ReconConfig(drop_prob=1.5), "--recon-drop must be in \\(0, 1\\]"),
    (lambda: ReconConfig(beta=(20.0,)), "beta needs two positive values"),
    (lambda: ReconConfig(mode="brecq"), "unknown reconstruction mode 'brecq'"),
    (lambda: AdaptiveConfig(rounds=2), "--rounds 2 needs --distill-steps"),
    (lambda: CalibrationOptions("gaussian:4", bias_correction_mode="exact"), "--bias-correction-mode"),
    (lambda: SynthesisConfig("bns", 0, 4, 0, "balanced", {}), "--num-images must be at least 1"),
    (lambda: SynthesisConfig("bns", 4, 4, 0, "balanced", {"lr": -1.0}), "--lr must be positive"),
    (lambda: SynthesisConfig("bns", 4, 4, 0, "balanced", {"tv_l2": float("inf")}), "--tv-l2"),
    (lambda: TrainConfig.from_dict({"epochs": 0}), "--epochs must be >= 1"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m for _, m in BAD])
def test_bad_values_are_one_line_zkd_errors(make, message):
    with pytest.raises(ZkdError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_option_spec_bounds_match_closed_forms():
    s = OptionSpec(min=0, max=1, min_open=True)
    assert [s.problem("p", v) is None for v in (0, 1e-9, 0.5, 1, 1.0000001)] == [False, True, True, True, False]
    assert OptionSpec(choices=("a", "b")).problem("mode", "c") == "unknown --mode 'c'; use one of a, b"
    assert OptionSpec(min=1).problem("x", None) is None and OptionSpec(min=1).problem("flag", True) is None


@dataclasses.dataclass
class _Toy(Config):
    steps: int = option(3, "Steps.", min=1)
    rate: float = option(0.5, "Rate.", min=0, max=1, min_open=True)
    mode: str = option("a", "Mode.", choices=("a", "b"))
    fast: bool = option(False, "Fast.")
    fold: bool = option(True, "Fold.", flag="--fold", secondary="--no-fold")
    hidden: int = 7

    def __post_init__(self) -> None:
        self.check_fields()


def test_generated_click_options_carry_the_field_defaults_and_bounds():
    from cli.common import config_options

    assert [f.name for f in option_fields(_Toy)] == ["steps", "rate", "mode", "fast", "fold"]

    @click.command()
    @config_options(_Toy, steps={"default": 10})
    def cmd(**kw):  # noqa: ANN003
        click.echo(json.dumps(_Toy(**kw).to_dict()))

    r = CliRunner()
    assert json.loads(r.invoke(cmd, []).output) == {"steps": 10, "rate": 0.5, "mode": "a", "fast": False,
                                                    "fold": True, "hidden": 7}
    assert json.loads(r.invoke(cmd, ["--rate", "1", "--mode", "b", "--fast", "--no-fold"]).output)["fold"] is False
    for bad in (["--rate", "0"], ["--steps", "0"], ["--mode", "c"]):
        assert r.invoke(cmd, bad).exit_code == 2
    assert "[default: 10; x>=1]" in r.invoke(cmd, ["--help"]).output


def test_calibrate_and_distill_defaults_come_from_the_configs():
    """The CLI's parameters are the fields' defaults (distill's epochs override excepted)."""
    from cli.calibrate import command as calibrate
    from cli.distill import command as distill

    params = {p.name: p for p in calibrate.params}
    for f in option_fields(CalibrationOptions):
        if f.default is not dataclasses.MISSING:
            assert params[f.name].default == f.default, f.name
    assert params["fold_bn"].opts == ["--fold"] and params["keep_8bit"].default == "first,last"
    dparams = {p.name: p for p in distill.params}
    assert dparams["epochs"].default == 10 and dparams["lr"].default == TrainConfig().lr
    assert dparams["batch_size"].type.min == 2
