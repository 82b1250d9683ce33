"""Export: a compiled step program written as a deployable artifact directory.

The directory layout and the manifest's JSON forms are :mod:`cachecompile.core.artifact`'s;
:func:`cachecompile.load` (:mod:`cachecompile.runtime.artifact`) reads it back into a
:class:`~cachecompile.core.program.StepProgram` and runs it with the same runtime as the
in-memory model.

>>> import cachecompile as cc                                               # doctest: +SKIP
>>> cached = cc.optimize(model, cc.Schedule.fora(20, 3), example_kwargs=call)  # doctest: +SKIP
>>> cached.export("dit-fora3", format="onnx")                               # doctest: +SKIP
>>> deployed = cc.load("dit-fora3")      # in any process                   # doctest: +SKIP

An artifact serves the call it was captured on: the same argument structure, shapes, dtypes
and constant arguments, and the schedule's number of steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils import _pytree as pytree

from cachecompile.backends import get_backend
from cachecompile.backends._common import sha256_file
from cachecompile.compile.pipeline import example_inputs
from cachecompile.core.artifact import (
    ARTIFACT_FORMAT, FORMATS, MANIFEST, STEP_INPUTS, WEIGHTS, artifact_files, leaf_to_json, region_map_to_json,
)
from cachecompile.core.program import StepProgram
from cachecompile.core.version import __version__

log = logging.getLogger(__name__)

__all__ = ["export_program"]


def export_program(
    program: StepProgram,
    model: torch.nn.Module,
    path: str | os.PathLike,
    format: str = "aoti",
    *,
    overwrite: bool = False,
    calls_per_step: int | str = 1,
    **options: Any,
) -> Path:
    """Write ``program``'s step graphs, schedule and calling convention into directory ``path``.

    ``format``: ``"aoti"`` (AOTInductor packages; weights saved once in ``weights.pt`` unless
    ``weights="embedded"``), ``"onnx"`` (ONNX models run by ONNX Runtime; ``opset_version=20``
    by default) or ``"tensorrt"`` (engines built from those ONNX models; needs ``tensorrt``).
    Other ``options`` go to the backend's ``export`` (``inductor_configs``, ``precision="fp16"`` ...).

    The export is all or nothing: it is written into a temporary sibling directory and moved
    into place at the end. ``path`` must not exist, be an empty directory, or (with
    ``overwrite=True``) hold an earlier artifact and nothing else, which is then replaced: a
    directory holding any file that is not part of a cachecompile artifact is never deleted.
    Returns ``path``.

    >>> cached.export("out/dit", format="onnx")   # doctest: +SKIP
    PosixPath('out/dit')
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if program.graphs is None:
        raise RuntimeError("this program was loaded from an artifact and has no step graphs to export again; copy the artifact directory instead")
    backend = get_backend(FORMATS[format])  # ImportError naming the pip extra when it is missing
    target = Path(path)
    _check_target(target, overwrite)
    if backend.name == "aoti":
        options.setdefault("weights", "external")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the artifact is an ordinary directory
    try:
        manifest = _write_artifact(program, model, staging, backend, format, calls_per_step, options)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _replace(target, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("cachecompile: exported %d step graphs (%s) to %s", len(manifest["graphs"]), format, target)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that holds anything but an earlier artifact (and that unless ``overwrite``)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another export path")
    present = {str(p.relative_to(target)) for p in target.rglob("*")}
    if not present:
        return
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        ours = artifact_files(manifest)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        ours = None
    foreign = sorted(present - ours) if ours is not None else sorted(present)
    if ours is None or foreign:
        # Never delete a directory we did not write, nor files we did not write.
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{target} is not empty and is not a cachecompile artifact (it holds {shown}); export into a new or "
            f"empty directory"
        )
    if not overwrite:
        raise FileExistsError(f"{target} already holds an artifact; pass overwrite=True (CLI: --force) to replace it")


def _replace(target: Path, staging: Path) -> None:
    if target.exists():
        shutil.rmtree(target)  # an empty directory, or an artifact the caller asked to replace
    staging.rename(target)


def _write_artifact(
    program: StepProgram, model: torch.nn.Module, directory: Path, backend: Any, format: str,
    calls_per_step: int | str, options: dict[str, Any],
) -> dict[str, Any]:
    call = program.call
    graphs_in = program.graphs or []
    user_names = [leaf.name for leaf in call.tensor_leaves]
    plans = _plan_names(program)
    graphs = []
    for i, (gm, io) in enumerate(zip(graphs_in, program.io)):
        entry = backend.export(
            gm, example_inputs(gm, program.example_inputs or []), directory, f"step{i}",
            input_names=user_names + [f"cache.{s}" for s in io.cache_inputs] + [f"step.{s}" for s in io.step_inputs],
            output_names=[f"output.{j}" for j in range(call.num_outputs)] + [f"cache_write.{s}" for s in io.cache_outputs],
            **options,
        )
        graphs.append({"entry": entry, **io.to_json(), "plan": plans[i]})

    weights = None
    if any("constants" in g["entry"] for g in graphs):  # aoti with weights="external"
        weights = _save_weights(directory, graphs, graphs_in)
    shared = getattr(backend, "share_weights", None)  # onnxruntime: one weights file for all graphs
    onnx_weights = shared(directory, [g["entry"] for g in graphs]) if shared is not None else None
    step_inputs = _save_step_inputs(directory, program)
    examples = program.example_inputs or []
    return {
        "format": ARTIFACT_FORMAT,
        "export_format": format,
        "backend": backend.name,
        "model_class": call.model_class,
        "model_config": _config_of(model),
        "schedule": program.schedule.to_dict(),
        "regions": region_map_to_json(program.region_map),
        "in_spec": pytree.treespec_dumps(call.in_spec),
        "out_spec": pytree.treespec_dumps(call.out_spec),
        "out_type": _out_type(call.out_spec),
        "leaves": [leaf_to_json(leaf) for leaf in call.leaves],
        "kwarg_order": list(call.kwarg_order),
        "num_outputs": call.num_outputs,
        "timestep_arg": call.timestep_arg,
        "device": str(examples[0].device) if examples else "cpu",
        "calls_per_step": calls_per_step,
        "graph_of_step": list(program.graph_of_step),
        "graphs": graphs,
        "weights": weights,
        "onnx_weights": onnx_weights,
        "step_inputs": step_inputs,
        "versions": {
            "torch": torch.__version__,
            "cachecompile": __version__,
            "python": ".".join(map(str, sys.version_info[:3])),
        },
    }


def _plan_names(program: StepProgram) -> list[str]:
    names = [""] * len(program.io)
    for plan, idx in zip(program.plans or [], program.graph_of_step):
        names[idx] = names[idx] or plan.describe()
    return names


def _save_weights(directory: Path, graphs: list[dict], gms: list[torch.fx.GraphModule]) -> dict[str, Any]:
    """Every constant the step graphs read, once. Graphs share the model's parameters under the
    same names; a name that holds *different* tensors in two graphs (a constant a pass lifted
    into one graph) is stored per graph, so no graph is ever handed another graph's tensor."""
    from cachecompile.backends.aoti import graph_constants

    stored: dict[str, torch.Tensor] = {}
    for i, (g, gm) in enumerate(zip(graphs, gms)):
        have = graph_constants(gm)
        keys = {}
        for spec in g["entry"].get("constants", []):
            name = spec["name"]
            if name not in have:
                raise RuntimeError(f"aoti step graph {i} needs constant {name!r}, which the graph does not hold (a bug: please report it)")
            tensor = _compact(have[name])
            key = name
            if key in stored and not _same_tensor(stored[key], tensor):
                key = f"step{i}/{name}"
            stored.setdefault(key, tensor)
            keys[name] = key
        g["constants"] = keys
    torch.save(stored, directory / WEIGHTS)
    return {"file": WEIGHTS, "sha256": sha256_file(directory / WEIGHTS), "count": len(stored),
            "bytes": sum(t.numel() * t.element_size() for t in stored.values())}


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes: ``torch.save`` writes a view's whole
    storage, and AOTInductor uses the loaded memory in place (it must be contiguous)."""
    t = t.detach()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def _save_step_inputs(directory: Path, program: StepProgram) -> dict[str, Any] | None:
    """Store the program's per-step input values (at every step that uses each), so the loaded
    artifact replays them; a value that repeats across steps (a prior table, a zero
    coefficient) is stored once."""
    if not program.step_values:
        return None
    stored: dict[str, torch.Tensor] = {}
    table: dict[str, list[str | None]] = {}
    for name, values in sorted(program.step_values.items()):
        table[name] = [None] * len(values)
        for step, value in enumerate(values):
            if value is None:
                continue
            value = _compact(value)
            same = next((k for k in dict.fromkeys(table[name]) if k is not None and _same_tensor(stored[k], value)), None)
            if same is None:
                same = f"{name}@{step}"
                stored[same] = value
            table[name][step] = same
    torch.save(stored, directory / STEP_INPUTS)
    return {"file": STEP_INPUTS, "sha256": sha256_file(directory / STEP_INPUTS), "values": table}


def _config_of(model: Any) -> dict[str, Any] | None:
    """The model's config (diffusers' ``model.config``), kept so ``loaded.config`` answers the
    questions a sampling loop asks (``sample_size``, ``in_channels``); JSON values only."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    out = {}
    for k, v in config.items():
        try:
            out[str(k)] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            continue
    return out


def _out_type(spec: pytree.TreeSpec) -> dict[str, Any] | None:
    """The output's top-level type when it is not a builtin (``Transformer2DModelOutput``)."""
    t = spec.type
    if t is None or t.__module__ == "builtins":
        return None
    context = spec.context
    fields = list(context) if isinstance(context, (list, tuple)) and all(isinstance(c, str) for c in context) else None
    return {"module": t.__module__, "name": t.__qualname__, "fields": fields}


