"""The ``aoti`` backend: one AOTInductor package (``<stem>.pt2``) per step graph.

The package holds the compiled kernels and the weights, so a loaded step needs neither the
model's Python code nor its weights object. A package only loads in the torch version that
built it (the C++ ABI and the package format change between releases): the entry records the
version and ``load`` refuses another one with a clear message.

By default each package embeds its own copy of the weights, so N distinct step graphs cost N
copies on disk. With ``weights="external"`` the package holds kernels only (AOTInductor's
experimental ``package_constants_in_so=False``); the entry lists the constants it needs
(name, shape, dtype) and ``load(..., constants=state_dict)`` hands them over without a copy
(``user_managed``): the artifact writer saves the model's weights once for all step graphs,
e.g. the union of ``graph_constants(gm)`` over them (a ``state_dict()`` misses non-persistent
buffers such as DiT's positional embedding).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from cachecompile.backends._common import (
    ArtifactError,
    BackendCompileError,
    TensorSpec,
    check_call_inputs,
    check_entry,
    check_version,
    dtype_to_str,
    graph_signature,
    make_entry,
)


class AOTIStep:
    """A loaded AOTInductor package, called like the step graph."""

    def __init__(self, runner: Any, inputs: list[TensorSpec], check_inputs: bool, where: str) -> None:
        self._runner = runner
        self._inputs = inputs
        self._check_inputs = check_inputs
        self._where = where

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        # A wrong shape reaches compiled kernels that index out of bounds: check first.
        if self._check_inputs:
            check_call_inputs(args, self._inputs, self._where)
        with torch.no_grad():
            return tuple(self._runner(*args))


class AOTIBackend:
    name = "aoti"
    bakes_weights = True  # the lowered graphs hold a copy of the weights

    def compile(self, gm: GraphModule, example_inputs: Sequence[Tensor], **options: Any) -> AOTIStep:
        """Package into a temporary directory and load it (the loaded model keeps no file open)."""
        with tempfile.TemporaryDirectory(prefix="cachecompile-aoti-") as tmp:
            entry = self.export(gm, example_inputs, Path(tmp), "step", **options)
            return self.load(Path(tmp), entry)

    def export(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Tensor],
        directory: Path,
        stem: str,
        *,
        inductor_configs: dict[str, Any] | None = None,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        weights: str = "embedded",
    ) -> dict[str, Any]:
        """Write ``<stem>.pt2``. ``inductor_configs`` go to ``aoti_compile_and_package``.

        ``weights="embedded"`` puts the weights in the package; ``"external"`` leaves them out
        and records in the entry which constants ``load`` must be given.
        """
        if weights not in ("embedded", "external"):
            raise ValueError(f"aoti weights={weights!r}: expected 'embedded' or 'external'")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        inputs, outputs = graph_signature(gm, example_inputs, input_names, output_names)
        ep = _export_step(gm, example_inputs, inputs)
        configs = dict(inductor_configs or {})
        if weights == "external":
            configs["aot_inductor.package_constants_in_so"] = False
        package = directory / f"{stem}.pt2"
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=configs)
        except Exception as e:
            raise BackendCompileError(f"aoti: AOTInductor failed to compile step graph {stem!r}: {e}") from e
        extra = {"constants": _constant_specs(ep)} if weights == "external" else {}
        return make_entry(
            "aoti", directory, {"package": package.name}, inputs, outputs,
            versions={}, options={"inductor_configs": inductor_configs or {}, "weights": weights},
            device=_device_of(example_inputs), **extra,
        )

    def load(
        self,
        directory: Path,
        entry: dict[str, Any],
        *,
        verify: bool = True,
        check_inputs: bool = True,
        run_single_threaded: bool = False,
        constants: Mapping[str, Tensor] | None = None,
    ) -> AOTIStep:
        """Load ``entry``'s package after checking files, checksums, torch version and device.

        ``constants`` (name → tensor, e.g. the model's ``state_dict()``) is required for a
        package exported with ``weights="external"``; the tensors must stay alive and on the
        package's device (they are used in place, not copied).
        """
        directory = Path(directory)
        inputs, _ = check_entry(directory, entry, "aoti", verify=verify)
        check_version(entry, "torch", torch.__version__)
        device = str(entry.get("device", "cpu"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ArtifactError(f"aoti: package {entry['files']['package']} was built for {device}, but CUDA is not available")
        path = directory / entry["files"]["package"]
        try:
            runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=run_single_threaded)
        except Exception as e:
            raise ArtifactError(f"aoti: cannot load {path} ({e}); re-export the model") from e
        if "constants" in entry:
            # Running a package without its constants crashes the process: check them first.
            given = _check_constants(entry["constants"], constants, path.name)
            runner.load_constants(given, check_full_update=True, user_managed=True)
        elif constants is not None:
            raise ValueError(f"aoti: {path.name} embeds its weights; do not pass constants")
        return AOTIStep(runner, inputs, check_inputs, f"aoti step {path.name}")


def _export_step(gm: GraphModule, example_inputs: Sequence[Tensor], inputs: list[TensorSpec]) -> Any:
    """torch.export the step graph; dimensions symbolic in the graph stay dynamic."""
    dims = torch.export.Dim.AUTO
    dynamic = tuple({i: dims for i, s in enumerate(spec.shape) if s is None} or None for spec in inputs)
    try:
        return torch.export.export(
            gm, tuple(example_inputs), strict=False,
            dynamic_shapes=dynamic if any(d is not None for d in dynamic) else None,
        )
    except Exception as e:
        raise BackendCompileError(f"aoti: torch.export of the step graph failed: {e}") from e


def graph_constants(gm: GraphModule) -> dict[str, Tensor]:
    """Every tensor a step graph reads through ``get_attr``: parameters, buffers (persistent
    or not) and plain tensor attributes, by their attribute path (the names AOTInductor uses)."""
    found = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor):
            found[str(node.target)] = value.detach()
    return found


def _constant_specs(ep: Any) -> list[dict[str, Any]]:
    """Name, shape and dtype of every weight and constant the exported program uses."""
    tensors = {**ep.state_dict, **ep.constants}
    return [TensorSpec(name, tuple(t.shape), dtype_to_str(t.dtype)).to_json() for name, t in sorted(tensors.items())
            if isinstance(t, torch.Tensor)]


def _check_constants(specs: list[dict[str, Any]], constants: Mapping[str, Tensor] | None, where: str) -> dict[str, Tensor]:
    if constants is None:
        raise ArtifactError(f"aoti: {where} was exported with weights='external'; pass constants=<the model's state_dict>")
    given = {}
    for spec in map(TensorSpec.from_json, specs):
        tensor = constants.get(spec.name)
        if tensor is None:
            raise ArtifactError(f"aoti: constant {spec.name!r} needed by {where} is missing from the weights given")
        if not spec.matches(tensor) or not tensor.is_contiguous():
            raise ArtifactError(
                f"aoti: constant {spec.describe()} needed by {where} does not match the weights given "
                "(shape, dtype and a contiguous layout must match: the package uses the memory in place)"
            )
        given[spec.name] = tensor.detach()
    return given


def _device_of(example_inputs: Sequence[Tensor]) -> str:
    devices = {str(t.device) for t in example_inputs}
    if len(devices) != 1:
        raise ValueError(f"step graph inputs are on several devices: {sorted(devices)}")
    return devices.pop()
