"""Lowering backends: turn one step graph into something that runs, or into files that load.

A *step graph* is a ``torch.fx.GraphModule`` called as ``gm(*user_inputs, *cache_inputs)``
that returns a tuple ``(*user_outputs, *cache_writes)``. Every backend lowers it the same
way and returns a callable with that calling convention:

>>> from cachecompile.backends import get_backend
>>> step = get_backend("inductor").compile(gm, example_inputs)        # doctest: +SKIP
>>> entry = get_backend("aoti").export(gm, example_inputs, out_dir, "step0")  # doctest: +SKIP
>>> step = get_backend("aoti").load(out_dir, entry)                   # doctest: +SKIP
>>> outputs = step(*example_inputs)                                   # doctest: +SKIP

A backend never falls back to eager: a failure to lower raises.

Backends and the extra that provides their dependencies:

| name          | lowers with                                 | export files               | extra    |
|---------------|---------------------------------------------|----------------------------|----------|
| ``eager``     | nothing (the GraphModule itself)            | not supported              |          |
| ``inductor``  | ``torch.compile(fullgraph=True)``           | not supported              |          |
| ``aoti``      | AOTInductor                                 | ``<stem>.pt2``             |          |
| ``onnxruntime``| ``torch.onnx.export`` + ONNX Runtime       | ``<stem>.onnx``            | onnx     |
| ``tensorrt``  | ONNX → TensorRT engine (or torch-tensorrt)  | ``<stem>.onnx``, ``.engine``| tensorrt |
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor
from torch.fx import GraphModule

from cachecompile.backends._common import ArtifactError, BackendCompileError, TensorSpec

__all__ = [
    "ArtifactError",
    "Backend",
    "BackendCompileError",
    "StepFn",
    "TensorSpec",
    "available_backends",
    "check_options",
    "get_backend",
]

StepFn = Callable[..., tuple[Tensor, ...]]


@runtime_checkable
class Backend(Protocol):
    """What the runtime needs from a backend (see the module docstring)."""

    name: str

    def compile(self, gm: GraphModule, example_inputs: Sequence[Tensor], **options: Any) -> StepFn:
        """Lower ``gm`` in memory; the result is called like ``gm`` and returns a tuple."""
        ...

    def export(
        self, gm: GraphModule, example_inputs: Sequence[Tensor], directory: Path, stem: str, **options: Any
    ) -> dict[str, Any]:
        """Write ``gm``'s artifact files into ``directory`` (named after ``stem``).

        Returns the JSON-able manifest entry that ``load`` needs.
        """
        ...

    def load(self, directory: Path, entry: dict[str, Any], **options: Any) -> StepFn:
        """Load what ``export`` wrote; checks files, checksums and versions first."""
        ...


# Keywords every backend's export/load takes from the compiler, never from the user.
_INTERNAL = {"self", "gm", "example_inputs", "directory", "stem", "entry", "verify", "constants", "input_names", "output_names"}

# name → (module, class, modules it imports, pip extra). Modules are imported lazily so that
# `import cachecompile.backends` never needs onnxruntime or tensorrt.
_REGISTRY: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "eager": ("cachecompile.backends.eager", "EagerBackend", (), ""),
    "inductor": ("cachecompile.backends.inductor", "InductorBackend", (), ""),
    "aoti": ("cachecompile.backends.aoti", "AOTIBackend", (), ""),
    "onnxruntime": ("cachecompile.backends.ort", "OnnxRuntimeBackend", ("onnx", "onnxscript", "onnxruntime"), "onnx"),
    "tensorrt": ("cachecompile.backends.trt", "TensorRTBackend", ("onnx", "onnxscript", "tensorrt"), "tensorrt"),
}
_ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime", "trt": "tensorrt"}


def available_backends() -> list[str]:
    """Every known backend name (whether or not its optional dependencies are installed)."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises ValueError for an unknown name (listing the known ones) and ImportError naming the
    pip extra to install when the backend's optional dependencies are missing.
    """
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown backend {name!r}; known backends: {known} (aliases: {', '.join(sorted(_ALIASES))})")
    module_name, class_name, needs, extra = _REGISTRY[key]
    if needs:
        from cachecompile.backends._common import require

        require(needs, key, extra)
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    return backend_cls()


def option_names(backend: Backend) -> set[str]:
    """The options ``cachecompile.optimize(model, schedule, backend, **options)`` accepts: the
    keywords of the backend's ``compile``, ``export`` and ``load`` (in-memory lowering goes
    through export and load), plus any ``extra_options`` it declares."""
    names: set[str] = set(getattr(backend, "extra_options", ()))
    for fn in (backend.compile, backend.export, backend.load):
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty):
                names.add(p.name)
    return names - _INTERNAL


def check_options(name: str, options: Mapping[str, Any]) -> Backend:
    """The backend called ``name``, after checking ``options`` against it: an unknown option is a
    TypeError naming the options it takes (at ``optimize``, not at the first call), and a
    backend may check values too (``validate_options``)."""
    backend = get_backend(name)
    accepted = option_names(backend)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"backend {backend.name!r} takes no option(s) {unknown}; "
            + (f"its options are {sorted(accepted)}" if accepted else "it takes no options")
        )
    validate = getattr(backend, "validate_options", None)
    if validate is not None:
        validate(**options)
    return backend
