"""The ``zkd calibrate`` pipeline as one library call: data -> folded student -> ranges -> recon / KD -> report.

Steps:

1. Read ``--data`` (``num_images`` calibration images plus up to ``holdout`` more, held out for the report);
   shards must come from this teacher (manifest ``weights_sha256``) and input spec.
2. Copy the teacher, fold BN into the copy (the teacher is never modified), keep that float copy as the
   reconstruction/SQNR reference, and replace Conv2d/Linear by fake-quantized layers.
3. Weight ranges: per-channel Lp (p = 2.4) clipping search. Activation ranges: per-tensor search on the
   calibration batches, then fixed. Default (``a_method="auto"``): the guard of :func:`_guarded_ptq` builds every
   candidate ``{mse, output, minmax} x {CLE + bias correction off, on}`` plus naive min/max and keeps the one whose
   logits are closest (KL) to the FP32 teacher's on the validation images
   (:mod:`~zeroshot_kd.quant.validation`: the held-out last quarter of the calibration images when they are close
   to the teacher's training data by its BN statistics, else a 64-image probe synthesized against those
   statistics, and all calibration images fit).
4. Optional ``recon`` (block reconstruction with AdaRound + learned activation steps, QDrop; on by default at
   <= 4 bits) on the fitting images, kept unless it raises the validation KL by more than ``check_tolerance``
   paired standard errors (``recon_check``; :class:`~zeroshot_kd.quant.validation.Comparison`); and/or
   ``finetune_steps`` of KD fine-tuning (weights + activation steps, default ``T^2``-scaled KL at T = 4) through the
   one training loop (:func:`zeroshot_kd.quant.finetuning.finetune`) on the fitting images, checked the same way
   (``finetune_check``).
5. Report: per-layer table, teacher-student agreement/KL on held-out images (when ``--data`` has no images beyond
   the calibration set, on calibration images, and then labelled "calibration-set agreement (no held-out
   images)"), optional real-data accuracy, timing.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import MISSING as _MISSING, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..bn import bn_layers
from ..config import Config, option, require
from ..data import make_dataset, parse_source
from ..errors import ZkdError
from ..evaluate import evaluate_model
from ..objectives import ObjectiveSet
from ..shards import read_manifest
from ..similarity import PREDICTOR, compute_signature, score_forms, teacher_signature, verdict
from .calibrate import ACT_METHODS, calibrate_activations, calibrate_weights
from .finetuning import DEFAULT_TEMPERATURE, finetune, finetune_objectives
from .fold import find_conv_bn_pairs, fold_bn
from .modules import LayerConfig, QuantConfig, check_supported, quantize_model
from .ranges import NEW_ACT_METHODS, calibrate_act_ranges, calibrate_activations_auto
from .recon import RECON_MODES, ReconConfig, reconstruct
from .equalize import (BIAS_CORRECTION_MODES, EQUALIZE_CRITERIA, RELU6_MODES, absorb_high_bias, analytic_input_means,
                       bn_stats, correct_bias, correct_bias_analytic, equalize)
from .mixed import choose_bits
from .report import CALIBRATION_SET_AGREEMENT, global_metrics, layer_report
from .validation import (CHECK_TOLERANCE, PROBE_ITERATIONS, VALIDATION_KINDS, Validation, bn_probe, guard_split,
                         make_validation, validation_kind)

__all__ = ["GUARD_METHODS", "RECON_DEFAULT_ITERS", "CalibrationOptions", "CalibrationResult", "calibrate_student",
           "calibration_fit", "check_data_teacher", "data_kind", "guard_split", "recon_by_default"]


#: Reconstruction steps per block by default: from the bench's accuracy-vs-iterations curve (bench/results/recon.md,
#: at the default rounding rate, recon.round_lr): on real images 100 steps give nearly all of the gain of
#: 1000 at a tenth of the cost (ResNet14 W3A3 PTQ 89.0 -> 91.5 at 100, 92.0 at 1000; MobileNetV2 W4A4 87.8 -> 89.4
#: at 100, 89.5 at 1000), and on noise more steps only fit the noise (MobileNetV2 W4A4 Gaussian 85.2 at 100, 81.9 at
#: 1000 steps with the papers' rate).
RECON_DEFAULT_ITERS = 100


def recon_by_default(config: QuantConfig) -> bool:
    """Reconstruction runs unless asked otherwise where PTQ ranges alone lose points: 4 bits or fewer."""
    return min(config.w_bits, config.a_bits) <= 4


@dataclass
class CalibrationOptions(Config):
    """Everything about *how* to calibrate (the QuantConfig says *what* the student is).

    Each field with an :func:`~zeroshot_kd.config.option` is also ``zkd calibrate``'s option of that name (flag,
    help, bounds and default written once, here); the bounds are checked for Python callers too.
    """

    data: str = option(_MISSING, "Calibration data: DIR or shards:DIR (zkd synthesize), folder:DIR, "
                       "fashion-mnist:train|test, gaussian:N.", metavar="SOURCE")
    num_images: int = option(1024, "Calibration images used: a seeded random sample of --data, stratified by class "
                             "where labels are known.", min=1)
    holdout: int = option(256, "Further images of --data kept out of calibration for the report's agreement/KL.",
                          min=0)
    eval_data: str | None = option(None, "Also report top-1/top-5 on this source (e.g. fashion-mnist:test).",
                                   metavar="SOURCE")
    eval_images: int | None = option(None, "Cap on --eval-data images.", kind="int", min=1)
    batch_size: int = option(32, "Batch size of calibration, reconstruction and fine-tuning.", min=1)
    w_method: str = option("lp", "Weight range search per channel.", choices=("lp", "mse", "minmax"))
    a_method: str = option("auto", "Activation range search per tensor: auto = build {mse, output, minmax} x "
                           "{CLE+bias correction off, on} and keep the one with the lowest logit KL to the FP32 teacher "
                           "on the validation images (see --validation); "
                           "output = clipping that minimizes the consuming layer's output error; "
                           "mse/lp/percentile/minmax = the tensor's own error.",
                           choices=tuple(reversed(NEW_ACT_METHODS)) + ACT_METHODS)
    lp_p: float = option(2.4, "Exponent of the lp searches.", min=1)
    candidates: int = option(100, "Clipping ratios tried per range.", min=1)
    percentile: float = option(99.99, "Upper percentile kept by --a-method percentile.", min=0, max=100,
                               min_open=True)
    act_images: int | None = option(None, "Images used for the activation range search [default: all calibration "
                                    "images].", kind="int", min=1)
    recon: bool | None = option(None, "Block-wise reconstruction against the float model (AdaRound weights, "
                                "learned activation steps, QDrop) [default: on at 4 bits or fewer (weights or "
                                "activations), off above].", kind="bool")
    recon_iters: int = option(RECON_DEFAULT_ITERS, "Optimizer steps per block.", min=0)
    recon_images: int | None = option(None, "Images cached for reconstruction [default: all calibration images].",
                                      kind="int", min=1)
    recon_drop: float = option(0.5, "QDrop probability of using the quantized value (1 = BRECQ, no dropping).",
                               min=0, max=1, min_open=True)
    recon_lambda: float = option(0.01, "AdaRound rounding-loss weight.", min=0)
    recon_lr: float | None = option(None, "Adam learning rate of the AdaRound rounding variables [default: "
                                    "1e-3 * sqrt(20000 / --recon-iters): the papers' 1e-3 at their 20k steps, "
                                    "0.014 at 100; 1e-3 fits far calibration data less].", kind="float", min=0,
                                    min_open=True)
    recon_check: bool = option(True, "Keep the PTQ student instead of the reconstructed one when reconstruction "
                               "raised the logit KL to the teacher on the validation images (see --validation) "
                               "beyond --check-tolerance.", kind="bool")
    finetune_check: bool = option(True, "Keep the student from before fine-tuning when fine-tuning raised the "
                                  "validation KL beyond --check-tolerance.", kind="bool")
    check_tolerance: float = option(CHECK_TOLERANCE, "The checks reject a reconstruction or a fine-tuning only when "
                                    "it raises the validation KL by more than this many standard errors of the "
                                    "per-image KL difference (0: any rise rejects).", min=0)
    finetune_mixup: bool = option(True, "Mix each fine-tuning batch with a permutation of itself (lam ~ U(0,1) per "
                                  "image; the teacher answers on the mixed images): keeps fine-tuning on a few or "
                                  "synthetic images from fitting their artifacts.", kind="bool")
    finetune_shift: int = option(0, "Translate each fine-tuning image by up to this many pixels before mixup "
                                 "(edges replicated; the teacher answers on the moved image); 0 = off.", min=0)
    finetune_flip: bool = option(False, "Mirror each fine-tuning image left-right with probability 1/2 (the "
                                 "teacher answers on the mirrored image).", kind="bool")
    probe_images: int = option(64, "Images of the BN probe: synthesized from the teacher's BN statistics (BNS-KL, "
                               "--probe-iterations steps), the validation images when the calibration images are "
                               "not close to the training data (--validation auto). 0: never a probe.", min=0)
    probe_iterations: int = option(PROBE_ITERATIONS, "Adam steps of the BN probe's synthesis: that many teacher "
                                   "forward+backward passes of one --probe-images batch (fewer: faster, but below "
                                   "500 the probe ranks students less like real data does).", min=1)
    validation: str = option("auto", "Validation images of the guard and the checks: held-out = the last quarter of "
                             "the calibration images (the rest fit); probe = the BN probe (all images fit); auto = "
                             "held-out when the calibration images are close to the teacher's training data by its "
                             "BN statistics (the zkd similarity verdict), else probe.", choices=VALIDATION_KINDS)
    validation_data: str | None = option(None, "Score the guard and the checks on these images alone (a few real "
                                         "images, or shards synthesized at full length) instead of the BN probe.",
                                         metavar="SOURCE")
    validation_images: int = option(256, "Images of --validation-data used (a seeded sample).", min=1)
    recon_mode: str = option("genie", "qdrop: AdaRound at the calibrated weight steps + LSQ activation steps, "
                             "QDrop; genie: GENIE-M, also learns the per-channel weight steps jointly with the "
                             "rounding.", choices=RECON_MODES)
    equalize: bool | None = option(None, "Cross-layer equalization of consecutive conv pairs (DFQ) on the folded "
                                   "float copy before quantization [default: chosen by the --a-method auto guard; with another "
                                   "--a-method: on with --keep-8bit none, else off].",
                                   kind="bool")
    relu6: str = option("clip", "Equalization through ReLU6: clip = per-channel rescaled clip (exact), relu = "
                        "replace by ReLU, skip = leave those pairs.", choices=RELU6_MODES)
    equalize_criterion: str = option("weight", "Equalization ranges: weight = DFQ (A's output-channel weight ranges "
                                     "vs B's input-channel ranges); activation = measured activation channel ranges "
                                     "vs B's input-channel ranges.", choices=tuple(reversed(EQUALIZE_CRITERIA)))
    bias_correction: bool | None = option(None, "Subtract the mean output shift caused by weight quantization "
                                          "[default: chosen by the --a-method auto guard, together with --equalize; "
                                          "with another --a-method: on with --keep-8bit none, else off].", kind="bool")
    bias_correction_mode: str = option("empirical", "empirical = mean output shift measured on the calibration "
                                       "images; analytic = DFQ's E[x] from the preceding BN's beta/gamma (clipped "
                                       "normal), data-free, only layers fed by conv+BN.",
                                       choices=BIAS_CORRECTION_MODES)
    absorb_bias: bool = option(False, "DFQ high-bias absorption (max(0, beta - 3 gamma) moved through a ReLU into "
                               "the next unpadded conv) on the folded float copy.", flag="--absorb-high-bias",
                               kind="bool")
    mixed_precision: bool = option(False, "Per-layer weight bits from {2,3,4,6,8} by ZeroQ sensitivity within "
                                   "--size-budget.")
    size_budget: str | None = option(None, "Weight size budget for --mixed-precision, e.g. 2.5MB or 0.125x of FP32 "
                                     "[default: the size of the uniform --bits student].", metavar="MB|RATIO")
    finetune_steps: int = option(0, "KD fine-tuning steps of weights and activation step sizes (0 = off; 4000 is "
                                 "the measured recipe: a few hundred steps can lose accuracy before it comes "
                                 "back, and the check then keeps the student before fine-tuning).", min=0)
    lr: float = option(3e-4, "Fine-tuning Adam learning rate of weights/biases (cosine decay).", min=0,
                       min_open=True)
    scale_lr: float | None = option(None, "Fine-tuning learning rate of the activation step sizes [default: --lr]; "
                                    "weight step sizes stay fixed.",
                                    kind="float", min=0, min_open=True)
    finetune_drop: float = option(1.0, "QDrop during fine-tuning: probability that an activation element uses its "
                                  "quantized value, else its full-precision one (1 = off; 0.5 helps fine-tuning on "
                                  "synthetic images at 3 bits, costs on real ones).", min=0, max=1, min_open=True)
    temperature: float = option(DEFAULT_TEMPERATURE, "KD temperature T of the fine-tuning loss "
                                "T^2 * KL(p_t^T || p_s^T).", min=0, min_open=True)
    seed: int = 0
    precision: str = "fp32"
    progress: bool = True
    verify: bool = True  # check shard sha256s against the manifest

    def __post_init__(self) -> None:
        self.check_fields()
        require([(self.size_budget is None or self.mixed_precision, "--size-budget needs --mixed-precision"),
                 (self.validation_data is None or self.validation_data != self.data,
                  "--validation-data is the --data source: validation images must be images the calibration does "
                  "not fit; pass other images (a few real ones, or another shard set)")])


@dataclass
class CalibrationResult:
    student: nn.Module
    fp_model: nn.Module
    layers: dict[str, LayerConfig]
    folded: list[tuple[str, str]]
    report: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


def data_kind(source: str) -> tuple[str, str]:
    """``(kind, argument)`` of a ``--data`` string: :func:`zeroshot_kd.data.parse_source`, the grammar's owner."""
    return parse_source(source)


def check_data_teacher(source: str, teacher: Any) -> None:
    """Refuse shards synthesized from other teacher weights than ``teacher`` (manifest ``weights_sha256``)."""
    kind, arg = data_kind(source)
    if kind != "shards":
        return
    manifest = read_manifest(arg)
    recorded = (manifest.get("teacher") or {}).get("weights_sha256")
    if recorded and teacher.weights_sha256 and recorded != teacher.weights_sha256:
        raise ZkdError(f"shards in {arg} were synthesized from another teacher (weights sha256 {recorded[:12]}...), "
                       f"not --teacher (sha256 {teacher.weights_sha256[:12]}...); synthesize shards for this teacher")


def _stack(ds: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(x.float())
        ys.append(torch.as_tensor(y).long())
    return torch.cat(xs), torch.cat(ys)


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]


def calibrate_student(teacher: Any, config: QuantConfig, opts: CalibrationOptions, device: torch.device | str,
                      objectives: Sequence[str] | ObjectiveSet | None = None) -> CalibrationResult:
    """Build, calibrate and optionally reconstruct / fine-tune a fake-quantized student of ``teacher``.

    Args:
        teacher: a :class:`~zeroshot_kd.teachers.Teacher` (model, spec, provenance); it is not modified.
        config: bits, grids and the 8-bit convention.
        opts: data, range-search methods, reconstruction and fine-tuning settings.
        device: where to run (a device or its name, e.g. ``"cpu"``, ``"cuda:0"``).
        objectives: fine-tuning objectives (spec strings or an ObjectiveSet); default ``kd:T=opts.temperature``.

    Returns:
        The student (eval mode), its float folded reference, per-layer configs, folded pairs and the report dict.
    """
    device = torch.device(device)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    objset = finetune_objectives(objectives, opts.temperature) if opts.finetune_steps > 0 else None
    check_data_teacher(opts.data, teacher)
    ds = make_dataset(opts.data, teacher.spec, num_images=opts.num_images + opts.holdout, seed=opts.seed,
                      verify=opts.verify)
    total = len(ds)
    n_cal = min(opts.num_images, total)
    cal_x, cal_y = _stack(Subset(ds, range(n_cal)))
    if total > n_cal:
        hold_x, _ = _stack(Subset(ds, range(n_cal, total)))
        separate = True
    else:
        hold_x, separate = cal_x[: max(opts.holdout, 1)], False
    timing["load_data"] = time.perf_counter() - t0

    do_recon = bool(opts.recon if opts.recon is not None else recon_by_default(config)) and opts.recon_iters > 0
    t = time.perf_counter()
    # The guard and the checks judge on images that fit nothing: --validation-data; else the held-out last quarter of
    # the calibration images when those are close to the teacher's training data (by its BN statistics), else the
    # BN probe (module docstring of .validation).
    validation: Validation | None = None
    fit_x = cal_x
    do_finetune = opts.finetune_steps > 0
    needs_validation = (opts.a_method == "auto" or (do_recon and opts.recon_check)
                        or (do_finetune and opts.finetune_check))
    # the verdict chooses the validation images (auto) and is reported beside reconstruction's rounding rate
    data_fit = (calibration_fit(teacher, cal_x, device)
                if (needs_validation and not opts.validation_data) or do_recon else None)
    if needs_validation and opts.validation_data:
        check_data_teacher(opts.validation_data, teacher)
        val_x, _ = _stack(make_dataset(opts.validation_data, teacher.spec, num_images=opts.validation_images,
                                       seed=opts.seed + 2, verify=opts.verify))
        validation = make_validation(teacher, val_x, "validation data", device, opts.precision,
                                     source=opts.validation_data)
    elif needs_validation:
        assert data_fit is not None
        kind = validation_kind(opts.validation, data_fit["verdict"], opts.probe_images)
        probe = (bn_probe(teacher, opts.probe_images, opts.seed, device, opts.probe_iterations, opts.progress)
                 if kind == "probe" else None)
        if probe is not None:
            validation = make_validation(teacher, probe, "probe", device, opts.precision,
                                         probe_iterations=opts.probe_iterations, verdict=data_fit["verdict"])
        else:  # the held-out quarter (also for a teacher without BN layers, which has no probe)
            n_held = guard_split(n_cal)
            fit_x, held_x = (cal_x[: n_cal - n_held], cal_x[n_cal - n_held:]) if n_held else (cal_x, cal_x)
            validation = make_validation(teacher, held_x, "held-out" if n_held else "calibration", device,
                                         opts.precision, verdict=data_fit["verdict"])
    if validation is not None:
        timing["validation_probe"] = time.perf_counter() - t
    t = time.perf_counter()
    act_x = fit_x[: opts.act_images or fit_x.shape[0]]
    # None = on where the benchmark shows it helps: every layer quantized (--keep-8bit none); see docs
    do_equalize = opts.equalize if opts.equalize is not None else not config.keep_8bit
    do_bias = opts.bias_correction if opts.bias_correction is not None else not config.keep_8bit
    guard: dict[str, Any] | None = None
    if opts.a_method == "auto":
        assert validation is not None
        pre = ([(False, False), (True, True)] if opts.equalize is None and opts.bias_correction is None
               else [(do_equalize, do_bias)])
        built, act_stats, guard = _guarded_ptq(teacher, config, opts, act_x, device, pre, validation)
        timing["weights"] = 0.0
    else:
        built = _build_student(teacher, config, opts, act_x, device, do_equalize, do_bias)
        timing["weights"] = time.perf_counter() - t
        t = time.perf_counter()
        act_stats, _ = calibrate_act_ranges(built.student, _batches(act_x, opts.batch_size), device, opts.a_method,
                                            opts.precision, opts.lp_p, opts.candidates, opts.percentile,
                                            seed=opts.seed, progress=opts.progress)
    student, fp_model, layers, folded = built.student, built.fp_model, built.layers, built.folded
    equalized, mixed, bias_shift = built.equalized, built.mixed, built.bias_shift
    for name, st in act_stats.items():
        layers[name].a_signed = bool(st["signed"])
    timing["activations"] = time.perf_counter() - t

    recon_hist: list[dict] = []
    rcfg: ReconConfig | None = None
    recon_check: dict[str, Any] | None = None
    if do_recon:
        t = time.perf_counter()
        recon_x = fit_x[: opts.recon_images or fit_x.shape[0]]
        rcfg = ReconConfig(iters=opts.recon_iters, batch_size=opts.batch_size, drop_prob=opts.recon_drop,
                           reg=opts.recon_lambda, lr_round=opts.recon_lr, mode=opts.recon_mode)
        checked = validation if opts.recon_check else None
        ptq_student = copy.deepcopy(student) if checked is not None else None
        recon_hist = reconstruct(student, fp_model, _batches(recon_x, 128), device, rcfg, seed=opts.seed,
                                 progress=opts.progress)
        if checked is not None and ptq_student is not None:
            verdict = checked.compare(ptq_student, student, device, opts.precision, opts.check_tolerance)
            student = student if verdict.kept else ptq_student
            recon_check = verdict.to_dict(("ptq_kl", "recon_kl"), ("ptq", "reconstruction"))
        timing["reconstruction"] = time.perf_counter() - t

    ft_hist: list[dict] = []
    ft_check: dict[str, Any] | None = None
    if do_finetune:
        t = time.perf_counter()
        before = copy.deepcopy(student) if opts.finetune_check and validation is not None else None
        ft_hist = finetune(student, teacher.model, TensorDataset(fit_x, cal_y[: fit_x.shape[0]]),
                           opts.finetune_steps, objset, lr=opts.lr, scale_lr=opts.scale_lr, batch_size=opts.batch_size,
                           seed=opts.seed, device=device, precision=opts.precision, spec=teacher.spec,
                           mixup=opts.finetune_mixup, shift=opts.finetune_shift,
                           flip=opts.finetune_flip, drop_prob=opts.finetune_drop, progress=opts.progress)
        if before is not None:  # set only when checked
            verdict = validation.compare(before, student, device, opts.precision, opts.check_tolerance)
            student = student if verdict.kept else before
            ft_check = verdict.to_dict(("before_kl", "finetune_kl"), ("before", "finetune"))
        timing["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    hold_batches = _batches(hold_x, 128)
    heldout = global_metrics(student, teacher.model, hold_batches, device, opts.precision)
    rows = layer_report(student, fp_model, _batches(hold_x[:256], 128), device)
    timing["report"] = time.perf_counter() - t
    evaluation = None
    if opts.eval_data:
        t = time.perf_counter()
        eval_ds = make_dataset(opts.eval_data, teacher.spec, num_images=opts.eval_images, seed=opts.seed + 1)
        evaluation = {"data": opts.eval_data,
                      "teacher": evaluate_model(teacher.model, eval_ds, device, precision=opts.precision,
                                                progress=opts.progress, desc="evaluate teacher"),
                      "student": evaluate_model(student, eval_ds, device, teacher=teacher.model,
                                                precision=opts.precision, progress=opts.progress,
                                                desc="evaluate student")}
        timing["evaluation"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0

    settings = {k: v for k, v in opts.to_dict().items() if k != "progress"}
    settings["recon"] = do_recon  # resolved: the report says what ran
    if rcfg is not None:
        settings["reconstruction"] = {**rcfg.to_dict(), "data_fit": data_fit}
    settings.update(calibration_images=n_cal, heldout_images=int(hold_x.shape[0]) if separate else 0,
                    device=str(device), torch=torch.__version__, teacher_sha256=teacher.weights_sha256,
                    finetune_loss=(f"T^2 KL, T={opts.temperature}" if not objectives else
                                   " + ".join(map(str, objectives)) if not isinstance(objectives, ObjectiveSet)
                                   else " + ".join(objectives.keys)),
                    bn_folded=len(folded), data_subset=getattr(ds, "zkd_subset", None))
    report = {
        "config": {**config.to_dict(), "convention": config.convention()},
        "settings": settings,
        "teacher": teacher.to_dict(),
        "heldout": heldout,
        "heldout_is_separate": separate,
        "agreement_label": "held-out agreement" if separate else CALIBRATION_SET_AGREEMENT,
        "eval": evaluation,
        "layers": rows,
        "recon": recon_hist,
        "recon_check": recon_check,
        "validation": validation.describe() if validation is not None else None,
        "ranges": guard or {"method": opts.a_method, "chosen": opts.a_method},
        "equalization": equalized,
        "bias_correction": bias_shift,
        "mixed_precision": mixed.to_dict() if mixed is not None else None,
        "finetune": ft_hist,
        "finetune_check": ft_check,
        "timing": timing,
    }
    summary = {"convention": config.convention(), "w_bits": config.w_bits, "a_bits": config.a_bits,
               "calibration_images": n_cal, "heldout_agreement": heldout["agreement"], "heldout_kl": heldout["kl"],
               "agreement_label": "held-out agreement" if separate else CALIBRATION_SET_AGREEMENT,
               "seconds": timing["total"]}
    if evaluation:
        summary.update(eval_data=opts.eval_data, teacher_top1=evaluation["teacher"]["top1"],
                       student_top1=evaluation["student"]["top1"], eval_agreement=evaluation["student"]["agreement"])
    return CalibrationResult(student, fp_model, layers, folded, report, summary)


#: Activation range sets the default guard (``--a-method auto``) compares: the previous default (per-tensor MSE),
#: the output-error search and naive min/max.
GUARD_METHODS = ("mse", "output", "minmax")


@dataclass
class _Built:
    student: nn.Module
    fp_model: nn.Module
    layers: dict[str, LayerConfig]
    folded: list[tuple[str, str]]
    equalized: dict[str, Any] | None
    mixed: Any
    bias_shift: dict[str, float] | None


def _build_student(teacher: Any, config: QuantConfig, opts: CalibrationOptions, fit_x: torch.Tensor,
                   device: torch.device, do_equalize: bool, do_bias: bool) -> _Built:
    """Fold, optionally equalize, (mixed-precision) quantize, calibrate the weights and optionally bias-correct a
    fresh copy of the teacher; ``fit_x`` are the images any data-dependent step uses. Activation ranges unset."""
    student = copy.deepcopy(teacher.model).eval()
    check_supported(student)
    folded: list[tuple[str, str]] = []
    stats = bn_stats(student, find_conv_bn_pairs(student)[0]) if config.fold_bn else {}
    if config.fold_bn:
        with torch.no_grad():
            folded = fold_bn(student, example=fit_x[:8].to(device))
        stats = {c: v for c, v in stats.items() if c in {a for a, _ in folded}}
    equalized = None
    if do_equalize:
        eq_batches = _batches(fit_x, 128) if opts.equalize_criterion == "activation" else None
        equalized = equalize(student, opts.relu6, batches=eq_batches, device=device, stats=stats)
    absorbed = absorb_high_bias(student, stats) if opts.absorb_bias else None
    if equalized is not None or absorbed is not None:
        equalized = {**(equalized or {}), "high_bias_absorbed": absorbed}
    analytic = do_bias and opts.bias_correction_mode == "analytic"
    means = analytic_input_means(student, stats) if analytic else {}
    mixed = None
    if opts.mixed_precision:
        mixed = choose_bits(student, config, fit_x, device, opts.size_budget, w_method=opts.w_method, p=opts.lp_p,
                            candidates=opts.candidates)
    fp_model = copy.deepcopy(student).eval().requires_grad_(False)
    layers = quantize_model(student, config, mixed.layer_configs if mixed is not None else None)
    student.requires_grad_(False).eval()
    calibrate_weights(student, opts.w_method, opts.lp_p, opts.candidates)
    bias_shift = (None if not do_bias else correct_bias_analytic(student, means) if analytic
                  else correct_bias(student, _batches(fit_x, 128), device))
    return _Built(student, fp_model, layers, folded, equalized, mixed, bias_shift)


@torch.no_grad()
def calibration_fit(teacher: Any, images: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """How far the calibration images are from the teacher's training data: their score against the teacher's BN
    running statistics (:data:`~zeroshot_kd.similarity.PREDICTOR`, ``zkd similarity``'s calibration predictor) and
    its verdict, recorded in the report and printed by ``zkd calibrate``. Why: reconstruction fits these images,
    so on far data it can fit their artifacts (50-step BNS shards: MobileNetV2 W3A3 78.1 -> 58.1 at the default
    rounding rate), and only images close to the training data can be their own validation set
    (``--validation auto``). ``score`` is None without BatchNorm.
    """
    if not bn_layers(teacher.model):
        return {"score": None, "verdict": "no BatchNorm statistics"}
    sig = compute_signature(teacher, TensorDataset(images), "calibration", batch_size=128, device=device)
    score = score_forms(teacher_signature(teacher), sig)[PREDICTOR]
    return {"score": score, "verdict": verdict(score)}


def _guarded_ptq(teacher: Any, config: QuantConfig, opts: CalibrationOptions, fit_x: torch.Tensor,
                 device: torch.device, pre: Sequence[tuple[bool, bool]], validation: Validation,
                 ) -> tuple[_Built, dict[str, dict[str, float]], dict[str, Any]]:
    """The default PTQ (``--a-method auto``): a whole-network, loss-aware guard over range sets and pre-steps.

    Why: no single range criterion or pre-step wins everywhere (measured: CLE + bias correction lifts every-layer
    MobileNetV2 W4A4 from 76.6 to 84.2 but drops every-layer ResNet14 W4A4 from 90.9 to 80.4; MSE ranges win on
    ResNet all-layers and lose at W3A3). So every candidate ``{mse, output, minmax} x pre`` (``pre``: CLE + bias
    correction off / on, unless set explicitly) is built, plus ``naive`` (min/max weights and activations, no
    pre-steps: the reference the PTQ path must not fall below), and scored by ``KL(p_teacher || p_student)`` of the
    logits against the FP32 teacher on the validation images (:mod:`~zeroshot_kd.quant.validation`: held-out
    calibration images or the BN probe), none of which set a range, corrected a bias or chose a bit; the lowest KL wins (ties: the earlier candidate, pre-steps off and MSE first). ``fit_x`` fits the ranges.

    Returns:
        (the chosen build, its per-layer activation stats, the report entry with every candidate's KL).
    """
    fit_batches = _batches(fit_x, opts.batch_size)
    kls: dict[str, float] = {}
    best: tuple[float, _Built, dict, str, tuple[bool, bool]] | None = None

    def consider(kl: float, built: _Built, stats: dict, name: str, eq: bool, bc: bool) -> None:
        nonlocal best
        kls[name] = kl
        if best is None or kl < best[0]:
            best = (kl, built, stats, name, (eq, bc))

    for eq, bc in pre:
        built = _build_student(teacher, config, opts, fit_x, device, eq, bc)
        stats, by_method = calibrate_activations_auto(
            built.student, fit_batches, device, opts.precision, methods=GUARD_METHODS, p=opts.lp_p,
            candidates=opts.candidates, percentile=opts.percentile, seed=opts.seed, progress=opts.progress,
            kl_batches=validation.batches, ref_logits=validation.ref_logits)
        suffix = ("+cle" if eq else "") + ("+bc" if bc else "")
        method = min(by_method, key=lambda m: (by_method[m], GUARD_METHODS.index(m)))
        kls.update({m + suffix: v for m, v in by_method.items() if m != method})
        consider(by_method[method], built, stats, method + suffix, eq, bc)
    if not opts.mixed_precision:  # the naive reference has uniform bits
        naive = _build_student(teacher, config, dataclasses.replace(opts, w_method="minmax"), fit_x, device, False,
                               False)
        stats = calibrate_activations(naive.student, fit_batches, len(fit_batches), device, opts.precision,
                                      "minmax", progress=opts.progress)
        consider(validation.score(naive.student, device, opts.precision), naive, stats, "naive", False, False)
    assert best is not None
    _, built, stats, chosen, (eq, bc) = best
    report = {"method": "auto", "chosen": chosen, "equalize": eq, "bias_correction": bc, "kl_by_candidate": kls,
              "kl_images": sum(int(b.shape[0]) for b in validation.batches), "fit_images": int(fit_x.shape[0]),
              **validation.describe()}
    return built, stats, report
