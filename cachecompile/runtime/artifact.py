"""The deployable artifact: a cached model's step graphs, exported once, loaded anywhere.

``cached.export(path, format)`` writes one directory::

    manifest.json     schedule, region map, call structure, step → graph map, versions,
                      and one backend entry per step graph (files, checksums, I/O specs)
    step0.pt2 ...     one file (or several) per distinct step plan, written by the backend
                      (aoti: step<i>.pt2; onnx: step<i>.onnx; tensorrt: step<i>.onnx + .engine)
    weights.pt        aoti only: the weights, once for all step graphs (the packages hold kernels)
    step_inputs.pt    per-step input values (compensation coefficients, step index), if any

``cachecompile.load(path)`` checks the whole directory (files, checksums, versions, that the
step graphs fit together and every cache slot is written before it is read) and returns a
:class:`~cachecompile.runtime.cached.CachedTransformer` that replays the schedule with the same runtime as
the in-memory one. It needs neither the model's Python code nor its weights object: the process
that loads it never imports the model's class (nor diffusers, when the model was called with
``return_dict=False``; with ``return_dict=True`` the output type's module is imported to rebuild
it, see :func:`load_artifact`).

>>> import cachecompile as cc                                               # doctest: +SKIP
>>> cached = cc.optimize(model, cc.Schedule.fora(20, 3), example_kwargs=call)  # doctest: +SKIP
>>> cached.export("dit-fora3", format="onnx")                               # doctest: +SKIP
>>> deployed = cc.load("dit-fora3")      # in any process                   # doctest: +SKIP
>>> out = deployed(**call)                                                  # doctest: +SKIP

An artifact serves the call it was captured on: the same argument structure, shapes, dtypes
and constant arguments (a different shape is an :class:`~cachecompile.runtime.cached.InputMismatchError` on
the first call, before anything runs), and the schedule's number of steps.
"""

from __future__ import annotations

import collections
import functools
import importlib
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

from cachecompile.backends import ArtifactError, get_backend
from cachecompile.backends._common import TensorSpec, dtype_from_str, dtype_to_str, sha256_file

log = logging.getLogger(__name__)

__all__ = ["ARTIFACT_FORMAT", "FORMATS", "export_cached", "load_artifact", "load", "read_manifest"]

ARTIFACT_FORMAT = "cachecompile.artifact/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
STEP_INPUTS = "step_inputs.pt"

# The user-facing format → the backend that writes and runs it.
FORMATS = {"aoti": "aoti", "onnx": "onnxruntime", "tensorrt": "tensorrt"}

# Backends whose files only run under the torch version that built them (a compiled .so against
# torch's C++ ABI). ONNX and TensorRT files do not depend on torch's version.
_TORCH_BOUND = {"aoti"}


# =========================================================================== export


def export_cached(cached: Any, path: str | os.PathLike, format: str = "aoti", *, overwrite: bool = False, **options: Any) -> Path:
    """Write ``cached``'s step graphs, schedule and calling convention into directory ``path``.

    ``format``: ``"aoti"`` (AOTInductor packages; weights saved once in ``weights.pt`` unless
    ``weights="embedded"``), ``"onnx"`` (ONNX models run by ONNX Runtime; ``opset_version=20``
    by default) or ``"tensorrt"`` (engines built from those ONNX models; needs ``tensorrt``).
    Other ``options`` go to the backend's ``export`` (``inductor_configs``, ``precision="fp16"`` ...).

    ``cached`` must be captured (called once, or optimized with example inputs). The export is
    all or nothing: it is written into a temporary sibling directory and moved into place at the
    end. ``path`` must not exist, be an empty directory, or (with ``overwrite=True``) hold an
    earlier artifact, which is then replaced. Returns ``path``.

    >>> cached.export("out/dit", format="onnx")   # doctest: +SKIP
    PosixPath('out/dit')
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    cap = getattr(cached, "_captured", None)
    if cap is None:
        raise RuntimeError(
            "this model has not been captured yet, so there is nothing to export: call it once with the "
            "inputs it will serve (e.g. one sampling step), or pass them to cachecompile.optimize(model, "
            "schedule, example_kwargs=...), then export"
        )
    if not cached._graphs:
        raise RuntimeError(
            "this model was loaded from an artifact and has no step graphs to export again; copy the "
            "artifact directory instead"
        )
    backend = get_backend(FORMATS[format])  # ImportError naming the pip extra when it is missing
    target = Path(path)
    _check_target(target, overwrite)
    if backend.name == "aoti":
        options.setdefault("weights", "external")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the artifact is an ordinary directory
    try:
        manifest = _write_artifact(cached, staging, backend, format, options)
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
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another export path")
    if not any(target.iterdir()):
        return
    if not (target / MANIFEST).is_file():
        # Never delete a directory we did not write.
        raise FileExistsError(f"{target} is not empty and holds no cachecompile artifact; choose a new or empty directory")
    if not overwrite:
        raise FileExistsError(f"{target} already holds an artifact; pass overwrite=True (CLI: --force) to replace it")


def _replace(target: Path, staging: Path) -> None:
    if target.exists():
        shutil.rmtree(target)  # an empty directory, or an artifact the caller asked to replace
    staging.rename(target)


def _write_artifact(cached: Any, directory: Path, backend: Any, format: str, options: dict[str, Any]) -> dict[str, Any]:
    from cachecompile.passes.cache_io import cache_io
    from cachecompile.runtime.cached import _positional_index

    import cachecompile

    cap = cached._captured
    user_names = [leaf.name for leaf in cap.tensor_leaves]
    graphs, constants = [], []
    for i, gm in enumerate(cached._graphs):
        io = cache_io(gm)
        entry = backend.export(
            gm, cached._example_inputs(cap, gm), directory, f"step{i}",
            input_names=user_names + [f"cache.{s}" for s in io["cache_inputs"]] + [f"step.{s}" for s in io["step_inputs"]],
            output_names=[f"output.{j}" for j in range(cap.num_outputs)] + [f"cache_write.{s}" for s in io["cache_outputs"]],
            **options,
        )
        graphs.append({
            "entry": entry,
            "cache_inputs": list(io["cache_inputs"]),
            "cache_outputs": list(io["cache_outputs"]),
            "step_inputs": list(io["step_inputs"]),
            "plan": _plan_of(cached, i),
        })
        constants.append(gm)

    weights = None
    if any("constants" in g["entry"] for g in graphs):  # aoti with weights="external"
        weights = _save_weights(directory, graphs, constants)
    shared = getattr(backend, "share_weights", None)  # onnxruntime: one weights file for all graphs
    onnx_weights = shared(directory, [g["entry"] for g in graphs]) if shared is not None else None
    step_inputs = _save_step_inputs(directory, cached, graphs)

    model = cached.model
    return {
        "format": ARTIFACT_FORMAT,
        "export_format": format,
        "backend": backend.name,
        "model_class": cap.meta.get("model_class", ""),
        "model_config": _config_of(model),
        "schedule": cached.schedule.to_dict(),
        "regions": _region_map_json(cached.region_map),
        "in_spec": pytree.treespec_dumps(cap.in_spec),
        "out_spec": pytree.treespec_dumps(cap.out_spec),
        "out_type": _out_type(cap.out_spec),
        "leaves": [_leaf_json(leaf) for leaf in cap.leaves],
        "kwarg_order": list(cap.kwarg_order),
        "num_outputs": cap.num_outputs,
        "timestep_arg": _positional_index(type(model), "timestep"),
        "device": str(cap.example_inputs[0].device) if cap.example_inputs else "cpu",
        "calls_per_step": cached._clock.declared,
        "graph_of_step": list(cached._graph_of_step),
        "graphs": graphs,
        "weights": weights,
        "onnx_weights": onnx_weights,
        "step_inputs": step_inputs,
        "versions": {
            "torch": torch.__version__,
            "cachecompile": cachecompile.__version__,
            "python": ".".join(map(str, sys.version_info[:3])),
        },
    }


def _plan_of(cached: Any, index: int) -> str:
    for plan, gm in cached.step_graphs.items():
        if gm is cached._graphs[index]:
            return plan.describe()
    return ""


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


def _save_step_inputs(directory: Path, cached: Any, graphs: list[dict]) -> dict[str, Any] | None:
    """Evaluate every per-step input at every step that uses it and store the values: the loaded
    artifact replays them without the providers (they are pure functions of the step)."""
    from cachecompile.runtime.cached import step_input_value

    names = sorted({n for g in graphs for n in g["step_inputs"]})
    if not names:
        return None
    stored: dict[str, torch.Tensor] = {}
    table: dict[str, list[str | None]] = {n: [None] * len(cached._graph_of_step) for n in names}
    for step, idx in enumerate(cached._graph_of_step):
        for name in graphs[idx]["step_inputs"]:
            value = _compact(step_input_value(cached, step, name))
            # Most values repeat across steps (a prior table, a zero coefficient): store each once.
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


def _region_map_json(region_map: Any) -> dict[str, Any]:
    return {
        "layout": {"branches": [list(b) for b in region_map.layout.branches], "has_stack": region_map.layout.has_stack},
        "patterns": {
            "blocks": list(region_map.patterns.blocks),
            "branches": dict(region_map.patterns.branches),
            "block_branches": {k: dict(v) for k, v in region_map.patterns.block_branches.items()},
        },
        "regions": {
            name: {"path": r.path, "nodes": sorted(r.nodes), "outputs": list(r.outputs), "inputs": list(r.inputs)}
            for name, r in region_map.regions.items()
        },
    }


def _out_type(spec: pytree.TreeSpec) -> dict[str, Any] | None:
    """The output's top-level type when it is not a builtin (``Transformer2DModelOutput``)."""
    t = spec.type
    if t is None or t.__module__ == "builtins":
        return None
    context = spec.context
    fields = list(context) if isinstance(context, (list, tuple)) and all(isinstance(c, str) for c in context) else None
    return {"module": t.__module__, "name": t.__qualname__, "fields": fields}


def _leaf_json(leaf: Any) -> dict[str, Any]:
    value = leaf.value
    if leaf.tensor_index is None:
        try:
            ok = json.loads(json.dumps(value)) == value
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"constant argument {leaf.name}={value!r} cannot be written to the artifact manifest (JSON numbers, "
                f"strings, booleans and None only); call the model with a tensor or a plain value instead"
            )
    return {
        "name": leaf.name,
        "tensor_index": leaf.tensor_index,
        "shape": None if leaf.shape is None else list(leaf.shape),
        "dtype": None if leaf.dtype is None else dtype_to_str(leaf.dtype),
        "value": value,
    }


# =========================================================================== load


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact in directory ``path``; :class:`ArtifactError` when there is
    none, it is not JSON, or it is of another artifact format version."""
    directory = Path(path)
    if directory.name == MANIFEST and directory.is_file():
        directory = directory.parent
    file = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; export an artifact there with cached.export({str(directory)!r})")
    if not file.is_file():
        raise ArtifactError(f"{directory} holds no {MANIFEST}: not a cachecompile artifact (write one with cached.export(path))")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file} is not valid JSON ({e}); re-export the model") from e
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{file} is artifact format {found!r}, but this cachecompile reads {ARTIFACT_FORMAT!r}; re-export the "
            f"model with this version of cachecompile (or load it with the version that wrote it)"
        )
    return manifest


def load_artifact(
    path: str | os.PathLike,
    *,
    calls_per_step: int | str | None = None,
    verify: bool = True,
    import_output_type: bool = True,
    **backend_options: Any,
) -> Any:
    """Load an exported directory as a runnable :class:`~cachecompile.runtime.cached.CachedTransformer`.

    Everything is checked before any step runs: the manifest's format version, every file and
    its sha256 (``verify=False`` skips the hashing), the torch version for AOTInductor packages,
    that each graph's inputs are the captured call's and that every cache slot a step reads is
    written by an earlier step. Failures raise :class:`ArtifactError` saying what to do.

    ``calls_per_step`` overrides the exported value (``"auto"``, or 2 when a pipeline calls the
    transformer twice per step). ``backend_options`` go to the backend's ``load``
    (``providers=[...]`` for ONNX Runtime ...).

    Outputs: when the model returned its own type (diffusers' ``Transformer2DModelOutput``), its
    module is imported to rebuild it (``import_output_type=False`` never imports it). If it
    cannot be imported, the loaded model returns a namedtuple with the same field names
    (``out.sample`` and ``out[0]`` both work).

    >>> import cachecompile as cc                 # doctest: +SKIP
    >>> deployed = cc.load("dit-fora3")           # doctest: +SKIP
    """
    from cachecompile.runtime.cached import CachedTransformer

    directory = Path(path)
    if directory.name == MANIFEST:
        directory = directory.parent
    m = read_manifest(directory)
    if m.get("backend") not in FORMATS.values():
        raise ArtifactError(f"{directory / MANIFEST} names backend {m.get('backend')!r}, not one of {sorted(FORMATS.values())}; re-export")
    backend = get_backend(m["backend"])  # ImportError naming the pip extra when it is missing
    _check_load_options(backend, backend_options)
    try:
        return _build(directory, m, backend, calls_per_step, verify, import_output_type, backend_options, CachedTransformer)
    except (KeyError, TypeError, IndexError) as e:
        raise ArtifactError(f"{directory / MANIFEST} is malformed ({type(e).__name__}: {e}); re-export the model") from e


load = load_artifact


def _check_load_options(backend: Any, options: Mapping[str, Any]) -> None:
    """Unknown backend options are the caller's mistake, not a malformed manifest: say so first."""
    import inspect

    accepted = set(inspect.signature(backend.load).parameters) - {"directory", "entry", "verify", "constants"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"{backend.name} artifacts take no load option(s) {unknown}; options: {sorted(accepted)}")


def _build(
    directory: Path, m: dict, backend: Any, calls_per_step: Any, verify: bool, import_output_type: bool,
    backend_options: dict[str, Any], cached_cls: type,
) -> Any:
    from cachecompile.schedule import Layout, Schedule
    from cachecompile.passes.capture import Captured, InputLeaf
    from cachecompile.passes.regions import Region, RegionMap, RegionPatterns

    backend_name = m["backend"]
    if backend_name in _TORCH_BOUND and m["versions"].get("torch") != torch.__version__:
        raise ArtifactError(
            f"{directory} was exported with torch {m['versions'].get('torch')}, but torch {torch.__version__} is "
            f"running; its {backend_name} packages only run under the torch that built them: install "
            f"torch=={m['versions'].get('torch')} or re-export the model with this torch"
        )
    try:
        schedule = Schedule.from_dict(m["schedule"])
    except Exception as e:
        raise ArtifactError(
            f"the artifact's schedule cannot be read by this cachecompile ({e}); if it uses a method or compensation "
            f"registered by your code, import that module before loading"
        ) from e
    leaves = [
        InputLeaf(d["name"], d["tensor_index"], None if d["shape"] is None else tuple(d["shape"]),
                  None if d["dtype"] is None else dtype_from_str(d["dtype"]), d["value"])
        for d in m["leaves"]
    ]
    graphs, graph_of_step = m["graphs"], [int(i) for i in m["graph_of_step"]]
    _check_consistency(directory, m, schedule, leaves, graphs, graph_of_step)

    device = torch.device(m.get("device", "cpu"))
    weights = _load_tensors(directory, m["weights"], "weights", verify, device) if m["weights"] else None
    step_table = _load_step_inputs(directory, m["step_inputs"], verify, graph_of_step, graphs, device)

    regions = m["regions"]
    layout = Layout(tuple(tuple(b) for b in regions["layout"]["branches"]), bool(regions["layout"]["has_stack"]))
    plans = _check_plans(schedule, layout, graph_of_step)

    runners = []  # last: the native loads are the expensive part
    for g in graphs:
        options = dict(backend_options)
        if "constants" in g:
            options["constants"] = {name: weights[key] for name, key in g["constants"].items()}  # type: ignore[index]
        runners.append(backend.load(directory, g["entry"], verify=verify, **options))
    region_map = RegionMap(
        {name: Region(name, r["path"], frozenset(r["nodes"]), tuple(r["outputs"]), tuple(r["inputs"]))
         for name, r in regions["regions"].items()},
        layout,
        RegionPatterns(tuple(regions["patterns"]["blocks"]), dict(regions["patterns"]["branches"]),
                       {k: dict(v) for k, v in regions["patterns"]["block_branches"].items()}),
    )
    captured = Captured(
        gm=None,  # type: ignore[arg-type]  # no graph: the backend's files are the graphs
        in_spec=_treespec(m["in_spec"], "input"),
        out_spec=_output_spec(m, import_output_type),
        leaves=leaves,
        example_inputs=[],
        num_outputs=int(m["num_outputs"]),
        kwarg_order=tuple(m["kwarg_order"]),
        meta={"model_class": m["model_class"], "timestep_arg": m["timestep_arg"], "artifact": str(directory),
              "device": str(device)},
    )

    cps = m["calls_per_step"] if calls_per_step is None else calls_per_step
    cached = cached_cls(None, schedule, backend=backend_name, calls_per_step=cps)
    cached._captured, cached.region_map, cached.plans = captured, region_map, plans
    cached._graph_of_step, cached._runners = graph_of_step, runners
    cached._io = [{k: list(g[k]) for k in ("cache_inputs", "cache_outputs", "step_inputs")} for g in graphs]
    cached._step_values = step_table
    if m.get("model_config") is not None:
        cached.config = ArtifactConfig(m["model_config"])
    cached.reset()
    log.info("cachecompile: loaded %s (%d step graphs, %s)", directory, len(runners), backend_name)
    return cached


class ArtifactConfig(dict):
    """The exported model's config: a dict whose keys also read as attributes (``config.sample_size``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the exported model's config has no {name!r}") from None


def _check_consistency(
    directory: Path, m: dict, schedule: Any, leaves: list, graphs: list[dict], graph_of_step: list[int]
) -> None:
    """The manifest's parts must fit together, so nothing fails mid-generation."""
    where = directory / MANIFEST
    if len(graph_of_step) != schedule.num_steps:
        raise ArtifactError(f"{where}: {len(graph_of_step)} steps mapped to graphs but the schedule has {schedule.num_steps}; re-export")
    if not graphs or any(not 0 <= i < len(graphs) for i in graph_of_step):
        raise ArtifactError(f"{where}: the step → graph map refers to graphs that are not in the manifest; re-export")
    n_out = int(m["num_outputs"])
    user = [TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in m["leaves"] if d["tensor_index"] is not None]
    slot_specs: dict[str, TensorSpec] = {}
    for i, g in enumerate(graphs):
        entry = g["entry"]
        if entry.get("backend") != m["backend"]:
            raise ArtifactError(f"{where}: graph {i} was exported for backend {entry.get('backend')!r}, the artifact for {m['backend']!r}; re-export")
        inputs = [TensorSpec.from_json(d) for d in entry["inputs"]]
        outputs = [TensorSpec.from_json(d) for d in entry["outputs"]]
        expected = len(user) + len(g["cache_inputs"]) + len(g["step_inputs"])
        if len(inputs) != expected or len(outputs) != n_out + len(g["cache_outputs"]):
            raise ArtifactError(f"{where}: graph {i}'s inputs/outputs do not match its cache slots; re-export the model")
        for have, want in zip(inputs, user):
            if have.name != want.name or have.shape != want.shape or have.dtype != want.dtype:
                raise ArtifactError(
                    f"{where}: graph {i} was built for input {have.describe()}, but the manifest's call has "
                    f"{want.describe()} (files from another export?); re-export the model"
                )
        # A slot read in one graph must have the shape another graph writes.
        reads = zip(g["cache_inputs"], inputs[len(user):])
        writes = zip(g["cache_outputs"], outputs[n_out:])
        for slot, spec in [*reads, *writes]:
            known = slot_specs.setdefault(slot, spec)
            if (known.shape, known.dtype) != (spec.shape, spec.dtype):
                raise ArtifactError(
                    f"{where}: cache slot {slot!r} is {known.dtype}{list(known.shape)} in one step graph and "
                    f"{spec.dtype}{list(spec.shape)} in graph {i}; re-export the model"
                )
    written: set[str] = set()
    for step, idx in enumerate(graph_of_step):
        missing = [s for s in graphs[idx]["cache_inputs"] if s not in written]
        if missing:
            raise ArtifactError(f"{where}: step {step} reads cache slot(s) {missing} that no earlier step writes; re-export")
        written.update(graphs[idx]["cache_outputs"])


def _check_plans(schedule: Any, layout: Any, graph_of_step: list[int]) -> list:
    """Resolve the schedule again: its steps must share graphs exactly as the exported ones do."""
    try:
        plans = schedule.resolve(layout)
    except Exception as e:
        raise ArtifactError(f"the artifact's schedule no longer resolves on its model layout ({e}); re-export the model") from e
    distinct: dict = {}
    again = [distinct.setdefault(p, len(distinct)) for p in plans]
    if again != graph_of_step:
        raise ArtifactError(
            f"the artifact's schedule resolves to the step → graph map {again}, but its graphs were exported for "
            f"{graph_of_step} (schedule edited, or another cachecompile version); re-export the model"
        )
    return plans


def _load_tensors(
    directory: Path, info: Mapping[str, Any], what: str, verify: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    file = directory / info["file"]
    if not file.is_file():
        raise ArtifactError(f"artifact file {file} ({what}) is missing; re-export the model into {directory}")
    if verify and sha256_file(file) != info["sha256"]:
        raise ArtifactError(f"artifact file {file} ({what}) is corrupt (sha256 mismatch); re-export the model")
    try:
        # mmap: on CPU the weights are paged in on use and never copied (AOTInductor uses them in place).
        return torch.load(file, weights_only=True, mmap=True, map_location=device)
    except Exception as e:
        raise ArtifactError(f"cannot read {file} ({e}); re-export the model") from e


def _load_step_inputs(
    directory: Path, info: Mapping[str, Any] | None, verify: bool, graph_of_step: list[int], graphs: list[dict],
    device: torch.device,
) -> dict[str, list[torch.Tensor | None]]:
    needed = {n for g in graphs for n in g["step_inputs"]}
    if info is None:
        if needed:
            raise ArtifactError(f"the step graphs take per-step inputs {sorted(needed)} but the artifact stores no values; re-export")
        return {}
    tensors = _load_tensors(directory, info, "per-step inputs", verify, device)
    table: dict[str, list[torch.Tensor | None]] = {}
    for name, keys in info["values"].items():
        table[name] = [None if k is None else tensors[k] for k in keys]
    for step, idx in enumerate(graph_of_step):
        for name in graphs[idx]["step_inputs"]:
            if name not in table or step >= len(table[name]) or table[name][step] is None:
                raise ArtifactError(f"step {step} needs per-step input {name!r}, which the artifact does not store; re-export")
    return table


def _treespec(text: str, what: str) -> pytree.TreeSpec:
    try:
        return pytree.treespec_loads(text)
    except Exception as e:
        raise ArtifactError(f"cannot rebuild the {what} structure from the manifest ({e}); re-export the model") from e


def _output_spec(m: dict, import_output_type: bool) -> pytree.TreeSpec:
    """The output structure. A non-builtin output type is registered with pytree by its own
    module: import it (unless told not to), else stand in a namedtuple with its fields."""
    text, out_type = m["out_spec"], m.get("out_type")
    try:
        return pytree.treespec_loads(text)
    except Exception:
        if out_type is None:
            raise ArtifactError("cannot rebuild the output structure from the manifest; re-export the model") from None
    if import_output_type:
        try:
            importlib.import_module(out_type["module"])
            return pytree.treespec_loads(text)
        except Exception as e:  # not installed, or installed but different
            log.warning("cachecompile: cannot rebuild output type %s.%s (%s); returning a namedtuple",
                        out_type["module"], out_type["name"], e)
    n = int(m["num_outputs"])
    fields = out_type.get("fields")
    if fields and len(fields) == n and all(f.isidentifier() for f in fields):
        stand_in = _stand_in_type(out_type["name"].rsplit(".", 1)[-1], tuple(fields))
        return pytree.tree_flatten(stand_in(*range(n)))[1]
    return pytree.tree_flatten(tuple(range(n)))[1]


@functools.lru_cache(maxsize=None)
def _stand_in_type(name: str, fields: tuple[str, ...]) -> type:
    """One namedtuple class per output type, so every load of it returns the same type."""
    return collections.namedtuple(name, fields)  # type: ignore[misc]
