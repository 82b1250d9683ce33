"""Loading a deployable artifact: the directory :mod:`cachecompile.compile.export` wrote (its
format: :mod:`cachecompile.core.artifact`) becomes a :class:`~cachecompile.core.program.StepProgram`
run by a :class:`~cachecompile.runtime.cached.CachedTransformer`, the same runtime as the
in-memory model.

``cachecompile.load(path)`` checks the whole directory (files, checksums, versions, that the
step graphs fit together and every cache slot is written before it is read) before anything
runs. It needs neither the model's Python code nor its weights object: the process that loads
it never imports the model's class (nor diffusers, when the model was called with
``return_dict=False``; with ``return_dict=True`` the output type's module is imported to rebuild
it; see :meth:`~cachecompile.runtime.cached.CachedTransformer.from_artifact`).

>>> import cachecompile as cc                 # doctest: +SKIP
>>> deployed = cc.load("dit-fora3")           # doctest: +SKIP
>>> out = deployed(**call)                    # doctest: +SKIP

An artifact serves the call it was captured on: the same argument structure, shapes, dtypes
and constant arguments (a different shape is an :class:`~cachecompile.InputMismatchError` on
the first call, before anything runs), and the schedule's number of steps.
"""

from __future__ import annotations

import collections
import functools
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils import _pytree as pytree

from cachecompile.backends import get_backend
from cachecompile.backends._common import TensorSpec, sha256_file
from cachecompile.core.artifact import (
    ARTIFACT_FORMAT, FORMATS, MANIFEST, TORCH_BOUND, dtype_to_str, leaf_from_json, region_map_from_json,
)
from cachecompile.core.errors import ArtifactError
from cachecompile.core.program import CallSpec, StepIO, StepProgram
from cachecompile.core.schedule import Schedule
from cachecompile.runtime.steps import check_calls_per_step

log = logging.getLogger(__name__)

__all__ = ["ArtifactConfig", "Loaded", "load_program", "read_manifest"]


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


@dataclass
class Loaded:
    """What an artifact holds for the runtime: the program, the declared calls per step and the
    exported model's config."""

    program: StepProgram
    calls_per_step: int | str
    config: "ArtifactConfig | None"


def load_program(
    path: str | os.PathLike,
    *,
    calls_per_step: int | str | None = None,
    verify: bool = True,
    import_output_type: bool = True,
    **backend_options: Any,
) -> Loaded:
    """Read and check an exported directory (see :meth:`CachedTransformer.from_artifact
    <cachecompile.runtime.cached.CachedTransformer.from_artifact>`, which ``cachecompile.load``
    calls) into the :class:`~cachecompile.core.program.StepProgram` it holds."""
    directory = Path(path)
    if directory.name == MANIFEST:
        directory = directory.parent
    m = read_manifest(directory)
    if m.get("backend") not in FORMATS.values():
        raise ArtifactError(f"{directory / MANIFEST} names backend {m.get('backend')!r}, not one of {sorted(FORMATS.values())}; re-export")
    backend = get_backend(m["backend"])  # ImportError naming the pip extra when it is missing
    _check_load_options(backend, backend_options)
    if calls_per_step is not None:
        check_calls_per_step(calls_per_step)  # the caller's own argument: their ValueError
    try:
        return _build(directory, m, backend, calls_per_step, verify, import_output_type, backend_options)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{directory / MANIFEST} is malformed ({type(e).__name__}: {e}); re-export the model") from e



def _check_load_options(backend: Any, options: Mapping[str, Any]) -> None:
    """Unknown backend options are the caller's mistake, not a malformed manifest: say so first."""
    import inspect

    accepted = set(inspect.signature(backend.load).parameters) - {"directory", "entry", "verify", "constants"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"{backend.name} artifacts take no load option(s) {unknown}; options: {sorted(accepted)}")


def _build(
    directory: Path, m: dict, backend: Any, calls_per_step: Any, verify: bool, import_output_type: bool,
    backend_options: dict[str, Any],
) -> Loaded:
    _check_field_types(directory / MANIFEST, m)
    backend_name = m["backend"]
    if backend_name in TORCH_BOUND and m["versions"].get("torch") != torch.__version__:
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
    leaves = [leaf_from_json(d) for d in m["leaves"]]
    graphs, graph_of_step = m["graphs"], [int(i) for i in m["graph_of_step"]]
    _check_consistency(directory, m, schedule, leaves, graphs, graph_of_step)
    if calls_per_step is None:
        cps = m["calls_per_step"]
        try:
            check_calls_per_step(cps)
        except ValueError as e:
            raise ArtifactError(f"{directory / MANIFEST}: {e}; re-export the model (or pass calls_per_step= to load)") from None
    else:
        cps = calls_per_step  # checked by load_program
    try:
        device = torch.device(m.get("device", "cpu"))
    except (RuntimeError, TypeError, ValueError) as e:
        raise ArtifactError(f"{directory / MANIFEST} names device {m.get('device')!r}, which torch does not know ({e}); re-export the model") from None
    weights = _load_tensors(directory, m["weights"], "weights", verify, device) if m["weights"] else None
    step_table = _load_step_inputs(directory, m["step_inputs"], verify, graph_of_step, graphs, device)
    region_map = region_map_from_json(m["regions"])
    plans = _check_plans(schedule, region_map.layout, graph_of_step)

    runners = []  # last: the native loads are the expensive part
    for g in graphs:
        options = dict(backend_options)
        if "constants" in g:
            options["constants"] = {name: weights[key] for name, key in g["constants"].items()}  # type: ignore[index]
        runners.append(backend.load(directory, g["entry"], verify=verify, **options))
    floats = [leaf.dtype for leaf in leaves if leaf.dtype is not None and leaf.dtype.is_floating_point]
    num_outputs = int(m["num_outputs"])
    program = StepProgram(
        call=CallSpec(
            in_spec=_treespec(m["in_spec"], "input"),
            out_spec=_output_spec(m, import_output_type),
            leaves=leaves,
            num_outputs=num_outputs,
            kwarg_order=tuple(m["kwarg_order"]),
            model_class=m["model_class"],
            timestep_arg=m["timestep_arg"],
        ),
        runners=runners,
        io=[StepIO.from_json(g, num_outputs) for g in graphs],
        graph_of_step=graph_of_step,
        step_values=step_table,
        schedule=schedule,
        backend=backend_name,
        reuses_outputs=any(getattr(r, "reuses_outputs", False) for r in runners),
        plans=plans,
        region_map=region_map,
        device=device,
        dtype=floats[0] if floats else torch.float32,
        source=str(directory),
    )
    config = ArtifactConfig(m["model_config"]) if m.get("model_config") is not None else None
    log.info("cachecompile: loaded %s (%d step graphs, %s)", directory, len(runners), backend_name)
    return Loaded(program, cps, config)


# The manifest's top-level fields and the JSON types they hold (None allowed where listed).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "versions": (dict,), "schedule": (dict,), "leaves": (list,), "graphs": (list,), "graph_of_step": (list,),
    "regions": (dict,), "in_spec": (str,), "out_spec": (str,), "kwarg_order": (list,), "model_class": (str,),
    "num_outputs": (int,), "timestep_arg": (int, type(None)), "model_config": (dict, type(None)),
    "weights": (dict, type(None)), "step_inputs": (dict, type(None)), "out_type": (dict, type(None)),
}


def _check_field_types(where: Path, m: dict) -> None:
    """Every field the loader reads has its JSON type, so a hand-edited or damaged manifest is an
    :class:`ArtifactError` at load, not a TypeError at the first call."""
    for name, types in _FIELD_TYPES.items():
        value = m.get(name)
        if name not in m and type(None) in types:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise ArtifactError(f"{where}: field {name!r} is {value!r:.60}, not {' or '.join(t.__name__ for t in types)}; re-export the model")
    lists = {"kwarg_order": str, "graph_of_step": int, "leaves": dict, "graphs": dict}
    for name, item in lists.items():
        if any(isinstance(v, bool) or not isinstance(v, item) for v in m[name]):
            raise ArtifactError(f"{where}: field {name!r} must hold {item.__name__} values, got {m[name]!r:.80}; re-export the model")
    if m["num_outputs"] < 1:
        raise ArtifactError(f"{where}: num_outputs is {m['num_outputs']}; re-export the model")


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
    # a batched leaf's dimension 0 is the graphs' dynamic batch (None in their specs)
    user = [
        TensorSpec(leaf.name, (None, *leaf.shape[1:]) if leaf.batched else leaf.shape, dtype_to_str(leaf.dtype))
        for leaf in leaves if leaf.tensor_index is not None
    ]
    slot_specs: dict[str, TensorSpec] = {}
    for i, g in enumerate(graphs):
        entry = g["entry"]
        if entry.get("backend") != m["backend"]:
            raise ArtifactError(f"{where}: graph {i} was exported for backend {entry.get('backend')!r}, the artifact for {m['backend']!r}; re-export")
        inputs = [TensorSpec.from_json(d) for d in entry["inputs"]]
        outputs = [TensorSpec.from_json(d) for d in entry["outputs"]]
        for spec in inputs + outputs:
            if any(isinstance(d, bool) or not isinstance(d, (int, type(None))) for d in spec.shape):
                raise ArtifactError(f"{where}: graph {i} has a tensor of shape {list(spec.shape)}; re-export the model")
        # every step graph returns the model's output: the same specs in all of them
        if i == 0:
            model_outputs = outputs[:n_out]
        elif [(o.shape, o.dtype) for o in outputs[:n_out]] != [(o.shape, o.dtype) for o in model_outputs]:
            raise ArtifactError(
                f"{where}: graph {i} returns {[o.describe() for o in outputs[:n_out]]} but graph 0 returns "
                f"{[o.describe() for o in model_outputs]}; re-export the model"
            )
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
