"""``zkd evaluate``: top-1 / top-5 of a student file or teacher on a data source, and agreement with a teacher."""

from __future__ import annotations

import click

from .common import device_option, echo, emit_json, handle_errors, json_option, precision_option, teacher_kwargs, \
    teacher_options, verify_option

EXAMPLES = """
\b
Examples:
  zkd evaluate --model w4a4.pt --data fashion-mnist:test --teacher fmnist_resnet14
  zkd evaluate --model fmnist_resnet14 --data fashion-mnist:test
"""


@click.command(help="Evaluate a model (a 'zkd calibrate' student file or any teacher spec) on a data source.\n"
               "The teacher options (--weights, --arch, ...) also apply to --model when it is a teacher spec.\n"
               + EXAMPLES, context_settings={"show_default": True, "max_content_width": 110})
@click.option("--model", "model_spec", required=True, metavar="STUDENT.pt|SPEC",
              help="Student file from 'zkd calibrate', or a teacher spec (file, module:function, torchvision, "
              "built-in).")
@teacher_options
@click.option("--data", required=True, metavar="SOURCE",
              help="DIR or shards:DIR, folder:DIR, fashion-mnist:train|test, gaussian:N.")
@click.option("--num-images", type=click.IntRange(min=1), default=None,
              help="Use a seeded random sample of N images, stratified by class where labels are known.")
@verify_option
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Evaluation batch size.")
@device_option
@precision_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
@handle_errors
def command(model_spec: str, data: str, num_images: int | None, batch_size: int, device: str, precision: str,
            quiet: bool, as_json: bool, verify: bool = True, **kw) -> None:  # noqa: ANN003
    from zeroshot_kd import load_teacher
    from zeroshot_kd.data import make_dataset
    from zeroshot_kd.errors import ZkdError
    from zeroshot_kd.evaluate import evaluate_model
    from zeroshot_kd.loading import load_model
    from zeroshot_kd.runtime import resolve_device

    dev = resolve_device(device)
    tk = teacher_kwargs(kw)
    teacher_spec = tk.pop("spec", None)
    model, spec, info = load_model(model_spec, dev, **tk)
    from zeroshot_kd.validate import check_teacher_input

    check_teacher_input(model, spec)  # --channels / --num-classes / --image-size against the model, one line
    teacher = None
    if teacher_spec:
        teacher = load_teacher(teacher_spec, device=dev, **tk)
        if teacher.spec.shape != spec.shape:
            raise ZkdError(f"--teacher expects input {teacher.spec.shape}, --model {spec.shape}; compare models "
                           "with the same input")
    if info["kind"] == "student":
        echo(f"student: {model_spec}; convention: {info['convention']}")
    ds = make_dataset(data, spec, num_images=num_images, verify=verify)
    res = evaluate_model(model, ds, dev, batch_size, teacher.model if teacher else None, precision, not quiet)
    fmt = lambda v, nd=2: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
    line = f"{data}: {res['images']} images, top-1 {fmt(res['top1'])}%, top-5 {fmt(res['top5'])}%"
    if teacher is not None:
        line += f", agreement with teacher {fmt(res['agreement'])}%, KL {fmt(res['kl'], 4)}"
    if res["labelled"] == 0:
        line += " (no labels in this source)"
    echo(line)
    if as_json:
        emit_json({"model": model_spec, "kind": info["kind"], "data": data, **res})
