"""Helpers shared by the backends: step-graph signatures, manifest entries, file checks.

A *manifest entry* is the JSON-able dict a backend's ``export`` returns and its ``load``
reads back. Every backend writes the same common fields so that the loader can check an
artifact before it touches a native library:

```
{"backend": "aoti", "entry_version": 1,
 "files": {"package": "step0.pt2"}, "sha256": {"step0.pt2": "…"},
 "inputs": [{"name": "hidden_states", "shape": [2, 4, 8, 8], "dtype": "float32"}, …],
 "outputs": [...], "versions": {"torch": "2.13.0+cpu", …}, "options": {…}}
```
A dimension that is dynamic (a symbolic size in the graph) is written as ``null``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from cachecompile.core.artifact import dtype_from_str, dtype_to_str
from cachecompile.core.errors import ArtifactError, BackendCompileError  # noqa: F401  (the backends import them from here)

ENTRY_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one graph input or output. ``None`` in shape = dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_str(self.dtype)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(d["shape"]), str(d["dtype"]))

    def matches(self, t: torch.Tensor) -> bool:
        if t.dtype != self.torch_dtype or t.dim() != len(self.shape):
            return False
        return all(s is None or s == int(d) for s, d in zip(self.shape, t.shape))

    def describe(self) -> str:
        dims = ", ".join("?" if s is None else str(s) for s in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


# ---------------------------------------------------------------------------------------
# Step-graph signatures


def _spec_of(name: str, value: Any) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"step graph value {name!r} is {type(value).__name__}, expected a tensor")
    return TensorSpec(name, tuple(_static_size(s) for s in value.shape), dtype_to_str(value.dtype))


def _static_size(size: Any) -> int | None:
    """A plain int, or a SymInt's value when it is specialised; None for a symbolic size."""
    if isinstance(size, torch.SymInt):
        return size.node.maybe_as_int()
    return int(size)


def default_input_names(gm: GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.find_nodes(op="placeholder")]


def graph_output_nodes(gm: GraphModule) -> list[Any]:
    out = gm.graph.output_node().args[0]
    if not isinstance(out, (tuple, list)):
        raise TypeError(
            "a step graph must return a tuple of tensors (the flat calling convention); "
            f"this graph returns {type(out).__name__}"
        )
    return list(out)


def graph_signature(
    gm: GraphModule,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of a step graph, from ``meta["val"]`` (eager run if absent).

    Input shapes come from the placeholders' FakeTensors, so a dimension exported as dynamic
    stays dynamic; the example inputs are only checked against them.
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"step graph has {len(placeholders)} inputs but {len(example_inputs)} example "
            "inputs were given"
        )
    in_names = list(input_names) if input_names is not None else default_input_names(gm)
    outs = graph_output_nodes(gm)
    out_names = list(output_names) if output_names is not None else [f"output_{i}" for i in range(len(outs))]
    _check_names("input", in_names, len(placeholders))
    _check_names("output", out_names, len(outs))
    if set(in_names) & set(out_names):
        raise ValueError(f"input and output names overlap: {sorted(set(in_names) & set(out_names))}")

    inputs = [
        _spec_of(name, node.meta.get("val", ex)) for name, node, ex in zip(in_names, placeholders, example_inputs)
    ]
    for spec, ex in zip(inputs, example_inputs):
        if not spec.matches(ex):
            raise ValueError(f"example input does not match the graph: {spec.describe()} got {_describe(ex)}")

    out_vals = [o.meta.get("val") if isinstance(o, torch.fx.Node) else None for o in outs]
    if any(not isinstance(v, torch.Tensor) for v in out_vals):
        with torch.no_grad():  # graphs built by hand may lack meta["val"] on outputs
            out_vals = list(gm(*example_inputs))
    outputs = [_spec_of(name, v) for name, v in zip(out_names, out_vals)]
    return inputs, outputs


def _check_names(kind: str, names: Sequence[str], expected: int) -> None:
    if len(names) != expected:
        raise ValueError(f"{len(names)} {kind} names given for {expected} graph {kind}s")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} names are not unique: {list(names)}")


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{dtype_to_str(t.dtype)}[{', '.join(str(int(s)) for s in t.shape)}] on {t.device}"
    return type(t).__name__


def check_call_inputs(args: Sequence[Any], specs: Sequence[TensorSpec], where: str) -> None:
    """Fail with a message naming the mismatching input, before a native runtime sees it."""
    if len(args) != len(specs):
        raise ValueError(f"{where}: expected {len(specs)} inputs ({_names(specs)}), got {len(args)}")
    for arg, spec in zip(args, specs):
        if not isinstance(arg, torch.Tensor) or not spec.matches(arg):
            raise ValueError(
                f"{where}: input {spec.describe()} was built for that shape and dtype, got "
                f"{_describe(arg)}; re-export the model for the new input shape"
            )


def _names(specs: Iterable[TensorSpec]) -> str:
    return ", ".join(s.name for s in specs)


# ---------------------------------------------------------------------------------------
# Manifest entries and artifact files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    """sha256_file, hashed once per file version: step graphs of one artifact share files."""
    st = path.stat()
    return _sha256_memo(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_memo(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def make_entry(
    backend: str,
    directory: Path,
    files: Mapping[str, str],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    versions: Mapping[str, str],
    options: Mapping[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Assemble a manifest entry; ``files`` maps a role ("package", "onnx", …) to a file name."""
    sha = {name: sha256_file(directory / name) for name in _all_files(directory, files)}
    return {
        "backend": backend,
        "entry_version": ENTRY_VERSION,
        "files": dict(files),
        "sha256": sha,
        "inputs": [s.to_json() for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        "versions": {"torch": torch.__version__, **versions},
        "options": jsonable(options),
        **extra,
    }


def _all_files(directory: Path, files: Mapping[str, str]) -> list[str]:
    """The role files plus ONNX external-data side files (``<name>.data``) when present."""
    names = list(files.values())
    for name in list(names):
        side = directory / f"{name}.data"
        if side.exists():
            names.append(side.name)
    return names


def jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON values (tuples → lists, dtypes → names); drops what cannot be kept."""

    def convert(v: Any) -> Any:
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, torch.dtype):
            return dtype_to_str(v)
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): convert(x) for k, x in v.items()}
        return repr(v)

    return {str(k): convert(v) for k, v in options.items()}


def check_entry(
    directory: Path,
    entry: Mapping[str, Any],
    backend: str,
    verify: bool = True,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Validate a manifest entry against the files on disk; returns (inputs, outputs).

    Raises ArtifactError with the fix in the message, so a broken artifact fails at load
    instead of crashing in a native library mid-generation.
    """
    directory = Path(directory)
    if entry.get("backend") != backend:
        raise ArtifactError(
            f"manifest entry is for backend {entry.get('backend')!r}, not {backend!r}: "
            f"load it with get_backend({entry.get('backend')!r})"
        )
    if entry.get("entry_version") != ENTRY_VERSION:
        raise ArtifactError(
            f"manifest entry version {entry.get('entry_version')!r} is not supported by this "
            f"cachecompile (expects {ENTRY_VERSION}); re-export the model"
        )
    for name, expected in dict(entry.get("sha256", {})).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing; re-export the model into {directory}")
        if verify and _sha256_of(path) != expected:
            raise ArtifactError(f"artifact file {path} is corrupt (sha256 mismatch); re-export the model")
    for name in dict(entry.get("files", {})).values():
        if not (directory / name).is_file():
            raise ArtifactError(f"artifact file {directory / name} is missing; re-export the model")
    try:
        inputs = [TensorSpec.from_json(d) for d in entry["inputs"]]
        outputs = [TensorSpec.from_json(d) for d in entry["outputs"]]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"manifest entry is malformed ({e!r}); re-export the model") from e
    return inputs, outputs


def check_version(entry: Mapping[str, Any], package: str, running: str) -> None:
    """Native artifacts (AOTI .so, TensorRT engines) only load in the version that built them."""
    recorded = dict(entry.get("versions", {})).get(package)
    if recorded != running:
        raise ArtifactError(
            f"artifact was built with {package} {recorded}, but {package} {running} is running; "
            f"install {package}=={recorded} or re-export the model with this version"
        )


# ---------------------------------------------------------------------------------------
# Optional dependencies


def require(modules: Sequence[str], backend: str, extra: str) -> None:
    """Import ``modules`` or raise ImportError naming the pip extra that provides them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"backend {backend!r} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'cachecompile[{extra}]'"
        )

