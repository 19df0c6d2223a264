"""The ``zkd`` click group. Each subcommand lives in its own module ``cli/<name>.py`` as ``command``."""

from __future__ import annotations

import importlib

import click

from zeroshot_kd import __version__

SUBCOMMANDS = ("synthesize", "calibrate", "evaluate", "similarity", "distill", "export")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="zkd")
def cli() -> None:
    """zkd: data-free synthesis, low-bit quantization and distillation for PyTorch classifiers.

    \b
    zkd synthesize   images from a frozen teacher's BatchNorm statistics -> shards
    zkd calibrate    a fake-quantized low-bit student on those shards
    zkd evaluate     accuracy of a teacher or student on a data source
    zkd similarity   how close datasets are to the teacher's unseen training data
    zkd distill      train any student from the teacher with KD objectives
    zkd export       a student as an ONNX QDQ graph for ONNX Runtime (or the teacher as FP32 ONNX)
    """


for _name in SUBCOMMANDS:  # a missing subcommand module is a broken install: fail loudly, never drop it
    _module = importlib.import_module(f"cli.{_name}")
    _module.command.context_settings.setdefault("max_content_width", 110)
    cli.add_command(_module.command, _name)


def main() -> None:
    cli(prog_name="zkd")


if __name__ == "__main__":
    main()
