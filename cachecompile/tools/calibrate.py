"""``python -m cachecompile calibrate``: calibrate GOC / EOC (or fit TeaCache's coefficients,
measure MagCache's ratios) on the uncached model and write the schedule file (see
:func:`cachecompile.calibrate`)."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from cachecompile.calibration import DEFAULT_ERROR_THRESHOLD, DEFAULT_GOC_WEIGHTS, as_compensation, calibrate
from cachecompile.core.schedule import Schedule
from cachecompile.methods.compensation import GOC
from cachecompile.tools.specs import parse_schedule
from cachecompile.tools.zoo import default_model_name, load_bench_model

__all__ = ["add_calibrate_arguments", "calibrate_main"]


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="digits (default when shipped), dit-s2, tiny, or module:attr")
    p.add_argument("--schedule", default="fora:4", help="a preset (fora:4, toca:...) or a .json schedule file")
    p.add_argument("--compensation", choices=["goc", "eoc", "taylor"], default=None,
                   help="what to calibrate (default: the schedule file's own compensation)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (a .json schedule fixes them)")
    p.add_argument("--samples", type=int, default=4, help="generations to calibrate on (num_samples)")
    p.add_argument("--batch", type=int, default=4, help="images per generation (the CFG batch is twice this)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--weight", type=float, default=None,
                   help="GOC weight (default: searched over %s)" % ",".join(map(str, DEFAULT_GOC_WEIGHTS)))
    p.add_argument("--queue", choices=["used", "computed"], default=None,
                   help="GOC queue (default computed: stable; used is the paper's rule, refused where it diverges)")
    p.add_argument("--search-weights", default=None, help="GOC: comma-separated candidate weights, e.g. 0,0.3,0.6,1")
    p.add_argument("--theta", type=float, default=None, help="EOC theta (default 0.01)")
    p.add_argument("--order", type=int, default=None, help="Taylor order (default 1)")
    p.add_argument("--cos-threshold", type=float, default=0.0, help="inflection test (cosine of successive differences)")
    p.add_argument("--error-threshold", type=float, default=DEFAULT_ERROR_THRESHOLD, help="EOC judgment (rel-L1 caching error)")
    p.add_argument("--prior", choices=["channel", "full"], default="channel")
    p.add_argument("--out", required=True, help="where to write the calibrated schedule (.json)")


def calibrate_main(args: argparse.Namespace) -> int:
    bm = load_bench_model(args.model or default_model_name())
    if args.schedule.endswith(".json"):
        schedule = Schedule.load(args.schedule)
    else:
        schedule = parse_schedule(args.schedule, args.steps)
    labels = torch.arange(args.batch) % bm.num_classes
    inputs = dict(class_labels=labels, guidance_scale=args.cfg, null_class=bm.null_class,
                  sample_size=bm.sample_size, in_channels=bm.in_channels)
    if schedule.method in ("teacache", "magcache"):  # teacache:T / magcache:T[:K]: their numbers, measured
        out, measured = calibrate(bm.model, schedule, inputs, args.samples, report=True)
        out.save(args.out)
        print(f"{out!r}\nwrote {args.out}")
        return 0
    try:
        comp = as_compensation(args.compensation, schedule)
    except ValueError as e:
        raise SystemExit(f"calibrate: {e} (--compensation goc|eoc|taylor)") from e
    settings = {"weight": args.weight, "queue": args.queue, "theta": args.theta, "order": args.order}
    fields = {f.name for f in dataclasses.fields(comp)}
    comp = dataclasses.replace(comp, **{k: v for k, v in settings.items() if v is not None and k in fields})
    weights = [float(w) for w in args.search_weights.split(",")] if args.search_weights else None
    if weights is None and isinstance(comp, GOC) and args.weight is None:
        weights = list(DEFAULT_GOC_WEIGHTS)  # the weight is calibrated unless given
    out, cal = calibrate(
        bm.model, schedule, inputs, args.samples, compensation=comp, cos_threshold=args.cos_threshold,
        error_threshold=args.error_threshold, prior=args.prior, weights=weights, report=True,
    )
    out.save(args.out)
    print(cal.summary(args.cos_threshold, args.error_threshold))
    print(f"{out!r}\nwrote {args.out}")
    return 0
