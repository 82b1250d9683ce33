"""Command line: ``python -m cachecompile bench`` (the main job) and the other tools."""

from __future__ import annotations

import argparse
from typing import Callable

from cachecompile.tools.bench import add_bench_arguments, bench_main
from cachecompile.tools.calibrate import add_calibrate_arguments, calibrate_main
from cachecompile.tools.export import add_export_arguments, export_main
from cachecompile.tools.tune import add_tune_arguments, tune_main

__all__ = ["COMMANDS", "main"]

# name → (add_arguments, run, help)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "bench": (add_bench_arguments, bench_main, "cached vs uncached, eager vs compiled, on a sampling run"),
    "calibrate": (add_calibrate_arguments, calibrate_main, "calibrate GOC / EOC on the uncached model; writes the schedule"),
    "export": (add_export_arguments, export_main, "export a cached model as an aoti / onnx / tensorrt artifact directory"),
    "tune": (add_tune_arguments, tune_main, "pick the schedule with the best fidelity at a target FLOPs ratio"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachecompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)
