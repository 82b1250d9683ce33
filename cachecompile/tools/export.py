"""``python -m cachecompile export``: write a cached model as a deployable directory.

It loads the model (the bundled ``digits`` model, ``tiny``, ``dit-s2``, or a user's
``module:attr`` as the bench does), captures it on one classifier-free-guidance batch built from
the model's config — ``hidden_states [2·batch, C, H, W]``, ``timestep [2·batch]``,
``class_labels [2·batch]``, ``return_dict=False``, the call :func:`cachecompile.sampling.ddim_sample`
makes — and exports the schedule's step graphs (:mod:`cachecompile.core.artifact`). Unless ``--no-verify``,
it then loads the directory back and checks that a whole sampling run of the loaded artifact
agrees with the eager cached model.

Example::

    python -m cachecompile export --schedule fora:3 --steps 20 --format onnx --out dit-fora3
    python -m cachecompile export --schedule my_schedule.json --format aoti --out out/ --model mypkg.models:dit

The artifact serves exactly that call: ``--batch`` images per call, the model's sample size,
and the schedule's number of steps. Load it with ``cachecompile.load(DIR)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cachecompile.backends import get_backend
from cachecompile.core.artifact import FORMATS
from cachecompile.tools.specs import parse_schedule
from cachecompile.tools.zoo import default_model_name, load_bench_model

__all__ = ["add_export_arguments", "export_main", "sample_call"]

DEFAULT_STEPS = 20
VERIFY_RTOL = 1e-4  # float32 backends agree with eager to ~2e-5 on the test models


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", required=True, help="a preset (fora:3, toca:3:0.3, duca:3:0.3 ...) or a schedule .json file")
    p.add_argument("--format", required=True, choices=["aoti", "onnx", "tensorrt"], help="what to export")
    p.add_argument("--out", required=True, help="the artifact directory (must be new or empty; see --force)")
    p.add_argument("--model", default=None, help="digits (default when its weights ship), tiny, dit-s2, or module:attr")
    p.add_argument("--batch", type=int, default=1, help="images per call (the exported CFG batch is twice this)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps of a preset schedule (default {DEFAULT_STEPS}); a .json schedule has its own")
    p.add_argument("--device", default="cpu", help="device the step graphs are built for (cpu; cuda for TensorRT)")
    p.add_argument("--weights", choices=["external", "embedded"], default=None,
                   help="aoti: weights once in weights.pt (external, the default) or inside every package")
    p.add_argument("--opset", type=int, default=None, help="onnx / tensorrt: ONNX opset (default 20)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None, help="tensorrt: engine precision")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in --out")
    p.add_argument("--no-verify", action="store_true", help="skip loading the artifact back and comparing a sampling run")


def sample_call(bench_model: Any, batch: int, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The transformer call of one DDIM step with CFG as one batched call (as ``ddim_sample``).

    >>> from cachecompile.tools.zoo import load_bench_model   # doctest: +SKIP
    >>> sample_call(load_bench_model("tiny"), 1)["hidden_states"].shape   # doctest: +SKIP
    torch.Size([2, 4, 16, 16])
    """
    bm = bench_model
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch) % bm.num_classes
    return dict(
        hidden_states=torch.randn(2 * batch, bm.in_channels, bm.sample_size, bm.sample_size, generator=g).to(device),
        timestep=torch.full((2 * batch,), 999, dtype=torch.int64, device=device),
        class_labels=torch.cat([labels, torch.full_like(labels, bm.null_class)]).to(device),
        return_dict=False,
    )


def _schedule(spec: str, steps: int | None) -> Any:
    import cachecompile as cc

    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise SystemExit(f"schedule file {spec} does not exist")
        schedule = cc.Schedule.load(spec)
        if steps is not None and steps != schedule.num_steps:
            raise SystemExit(f"schedule {spec} has {schedule.num_steps} steps but --steps is {steps}; drop --steps")
        return schedule
    try:
        return parse_schedule(spec, steps if steps is not None else DEFAULT_STEPS)
    except ValueError as e:
        raise SystemExit(f"export: {e}") from None


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The backend options the flags ask for; a flag for another format is an error."""
    given = {"weights": ("--weights", args.weights, {"aoti"}),
             "opset_version": ("--opset", args.opset, {"onnx", "tensorrt"}),
             "precision": ("--precision", args.precision, {"tensorrt"})}
    opts = {}
    for key, (flag, value, formats) in given.items():
        if value is None:
            continue
        if args.format not in formats:
            raise SystemExit(f"{flag} applies to --format {' / '.join(sorted(formats))}, not {args.format}")
        opts[key] = value
    return opts


def export_main(args: argparse.Namespace) -> int:
    import cachecompile as cc

    if args.batch < 1:
        raise SystemExit("--batch must be >= 1")
    options = _options(args)
    try:  # before the model loads: a missing extra fails in a second
        get_backend(FORMATS[args.format])
    except ImportError as e:
        raise SystemExit(str(e)) from None
    schedule = _schedule(args.schedule, args.steps)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"{out} is not empty; choose a new directory or pass --force to replace an earlier artifact")
    bm = load_bench_model(args.model or default_model_name())
    device = torch.device(args.device)
    model = bm.model.to(device).eval()
    call = sample_call(bm, args.batch, device)

    t0 = time.perf_counter()
    cached = cc.optimize(model, schedule, example_kwargs=call)
    try:
        cached.export(out, args.format, overwrite=args.force, **options)
    except (FileExistsError, ImportError) as e:  # a taken --out, a missing extra: the message says what to do
        raise SystemExit(str(e)) from None
    seconds = time.perf_counter() - t0
    print(f"exported {bm.name} × {schedule!r} as {args.format} to {out} in {seconds:.1f} s")
    print(f"  call: hidden_states {list(call['hidden_states'].shape)}, timestep/class_labels [{2 * args.batch}], "
          f"{schedule.num_steps} steps → {len(cached.step_graphs)} step graphs {cached.program.graph_of_step}")
    total = 0
    for f in sorted(out.iterdir()):
        total += f.stat().st_size
        print(f"  {f.name:<24} {f.stat().st_size / 1e6:9.2f} MB")
    print(f"  {'total':<24} {total / 1e6:9.2f} MB")
    print(f"load it with: cachecompile.load({str(out)!r})")
    if args.no_verify:
        return 0
    return _verify(cached, out, bm, args, options)


def _verify(cached: Any, out: Path, bm: Any, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Load the directory back and compare a whole sampling run with the eager cached model."""
    import cachecompile as cc
    from cachecompile.sampling import ddim_sample

    if torch.device(args.device).type != "cpu":
        print("not verified: the check runs on CPU only (load the artifact on its device and compare yourself)")
        return 0
    loaded = cc.load(out)
    labels = torch.arange(args.batch) % bm.num_classes
    kw = dict(num_steps=cached.schedule.num_steps, null_class=bm.null_class, sample_size=bm.sample_size,
              in_channels=bm.in_channels, seed=0)
    expected = ddim_sample(cached, labels, **kw)
    got = ddim_sample(loaded, labels, **kw)
    rel = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
    exact = options.get("precision", "fp32") == "fp32"
    ok = rel <= VERIFY_RTOL or not exact
    print(f"verified: a {kw['num_steps']}-step sampling run of the loaded artifact vs the eager cached model: "
          f"max relative difference {rel:.2e}" + ("" if ok else f" > {VERIFY_RTOL:g}: FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m cachecompile export", description=__doc__)
    add_export_arguments(parser)
    sys.exit(export_main(parser.parse_args()))
