"""Command line: ``python -m cachecompile bench`` (the main job) and the other tools."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

# Subcommands register here: name → (add_arguments, run).
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def _register_builtin() -> None:
    from cachecompile.bench import add_bench_arguments, bench_main

    COMMANDS["bench"] = (add_bench_arguments, bench_main, "cached vs uncached, eager vs compiled, on a sampling run")
    from cachecompile.calibration import add_calibrate_arguments, calibrate_main

    COMMANDS["calibrate"] = (add_calibrate_arguments, calibrate_main, "calibrate GOC / EOC on the uncached model; writes the schedule")
    from cachecompile.export_cli import add_export_arguments, export_main

    COMMANDS["export"] = (add_export_arguments, export_main, "export a cached model as an aoti / onnx / tensorrt artifact directory")


def main(argv: list[str] | None = None) -> int:
    _register_builtin()
    parser = argparse.ArgumentParser(prog="python -m cachecompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
