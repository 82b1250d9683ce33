"""The ``onnxruntime`` backend: one ONNX model per step graph, run by ONNX Runtime.

Tensors cross into ONNX Runtime through IOBinding with their ``data_ptr()``: inputs are read
in place and outputs are written straight into freshly allocated torch tensors, so no copy is
made on CPU or GPU (a fresh output per call: the caller may keep a step's output while the
next step runs). Outputs whose shape is dynamic are allocated by ONNX Runtime instead (CPU
only).

ONNX Runtime silently falls back to the CPU provider when a requested one is unavailable;
``load`` checks that the first requested provider is really active and raises otherwise.
"""

from __future__ import annotations

import ctypes

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from cachecompile.backends._common import (
    ArtifactError,
    TensorSpec,
    check_call_inputs,
    check_entry,
    graph_signature,
    make_entry,
    sha256_file,
)
from cachecompile.backends.onnx_export import DEFAULT_OPSET, export_onnx, onnx_dtype, share_initializers

SHARED_WEIGHTS = "weights.onnx.data"  # an artifact's step graphs' weights, once (share_weights)


class OrtStep:
    """An ``onnxruntime.InferenceSession`` called like the step graph."""

    def __init__(self, session: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], where: str) -> None:
        self._session = session
        self._inputs = inputs
        self._outputs = outputs
        # The exporter may drop an input the graph never reads: bind only the session's.
        session_inputs = {i.name for i in session.get_inputs()}
        self._bound = [i for i, s in enumerate(inputs) if s.name in session_inputs]
        self._where = where

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        check_call_inputs(args, self._inputs, self._where)
        device = args[0].device if args else torch.device("cpu")
        binding = self._session.io_binding()
        keep = []  # contiguous copies must outlive the run
        for i in self._bound:
            t = args[i].detach().contiguous()
            keep.append(t)
            binding.bind_input(
                self._inputs[i].name, t.device.type, _index(t.device), onnx_dtype(t.dtype), list(t.shape), t.data_ptr()
            )
        results: list[Tensor | None] = []
        for spec in self._outputs:
            if None in spec.shape:
                if device.type != "cpu":
                    raise NotImplementedError(f"{self._where}: dynamic output {spec.name} on {device} is not supported")
                binding.bind_output(spec.name, "cpu")
                results.append(None)
                continue
            out = torch.empty(spec.shape, dtype=spec.torch_dtype, device=device)
            binding.bind_output(spec.name, out.device.type, _index(out.device), onnx_dtype(out.dtype), list(out.shape), out.data_ptr())
            results.append(out)
        if device.type == "cuda":
            # ONNX Runtime runs on its own stream: torch's pending writes to the inputs first.
            torch.cuda.current_stream(device).synchronize()
        self._session.run_with_iobinding(binding)
        if any(r is None for r in results):
            ort_values = binding.get_outputs()
            results = [r if r is not None else _from_ort(ort_values[i], spec.torch_dtype)
                       for i, (r, spec) in enumerate(zip(results, self._outputs))]
        return tuple(results)  # type: ignore[arg-type]


def _from_ort(value: Any, dtype: torch.dtype) -> Tensor:
    """An output ONNX Runtime allocated on the CPU, as a torch tensor of its own. numpy has no
    bfloat16 or float8 (a low-precision cache, ``cache_dtype``): those are copied byte for byte."""
    if dtype not in _NOT_IN_NUMPY:
        return torch.from_numpy(value.numpy())
    out = torch.empty(value.shape(), dtype=dtype)
    ctypes.memmove(out.data_ptr(), value.data_ptr(), out.numel() * out.element_size())
    return out


_NOT_IN_NUMPY = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}


def _index(device: torch.device) -> int:
    return device.index or 0


class OnnxRuntimeBackend:
    name = "onnxruntime"
    bakes_weights = True  # the lowered graphs hold a copy of the weights

    def compile(self, gm: GraphModule, example_inputs: Sequence[Tensor], **options: Any) -> OrtStep:
        """Export to a temporary file and open a session (which reads the file into memory)."""
        load_keys = {"providers", "provider_options", "intra_op_num_threads", "graph_optimization_level"}
        load_opts = {k: options.pop(k) for k in list(options) if k in load_keys}
        with tempfile.TemporaryDirectory(prefix="cachecompile-onnx-") as tmp:
            entry = self.export(gm, example_inputs, Path(tmp), "step", **options)
            return self.load(Path(tmp), entry, **load_opts)

    def export(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Tensor],
        directory: Path,
        stem: str,
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        opset_version: int = DEFAULT_OPSET,
        external_data: bool | None = None,
        optimize: bool = True,
    ) -> dict[str, Any]:
        """Write ``<stem>.onnx`` (and ``<stem>.onnx.data`` for weights over 1 GiB)."""
        import onnx
        import onnxruntime

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        inputs, outputs = graph_signature(gm, example_inputs, input_names, output_names)
        onnx_file = export_onnx(
            gm, example_inputs, directory / f"{stem}.onnx", inputs, outputs,
            opset_version=opset_version, external_data=external_data, optimize=optimize,
        )
        return make_entry(
            "onnxruntime", directory, {"onnx": onnx_file.path.name}, inputs, outputs,
            versions={"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            options={"opset_version": onnx_file.opset, "external_data": onnx_file.external_data, "optimize": optimize},
            opset=onnx_file.opset,
        )

    def share_weights(self, directory: Path, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """After every step graph of an artifact was exported: one copy of their weights, in
        ``weights.onnx.data``, which every ``<stem>.onnx`` references; the entries list it."""
        directory = Path(directory)
        names = [e["files"]["onnx"] for e in entries]
        shared = share_initializers(directory, names, SHARED_WEIGHTS)
        sha = {name: sha256_file(directory / name) for name in [*names, SHARED_WEIGHTS]}
        for entry in entries:
            entry["files"]["weights"] = SHARED_WEIGHTS
            entry["sha256"] = {name: sha[name] for name in entry["files"].values()}
        return {**shared, "sha256": sha[SHARED_WEIGHTS]}

    def load(
        self,
        directory: Path,
        entry: dict[str, Any],
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        provider_options: Sequence[dict[str, Any]] | None = None,
        intra_op_num_threads: int | None = None,
        graph_optimization_level: str = "ORT_ENABLE_ALL",
        verify: bool = True,
    ) -> OrtStep:
        """Open an ONNX Runtime session on ``entry``'s model; ``providers[0]`` must be active."""
        import onnxruntime

        directory = Path(directory)
        inputs, outputs = check_entry(directory, entry, "onnxruntime", verify=verify)
        path = directory / entry["files"]["onnx"]
        so = onnxruntime.SessionOptions()
        so.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, graph_optimization_level)
        if intra_op_num_threads is not None:
            so.intra_op_num_threads = intra_op_num_threads
        try:
            session = onnxruntime.InferenceSession(
                str(path), sess_options=so, providers=list(providers), provider_options=provider_options
            )
        except Exception as e:
            raise ArtifactError(f"onnxruntime: cannot load {path} ({e}); re-export the model") from e
        active = session.get_providers()
        if not active or active[0] != providers[0]:
            raise ArtifactError(
                f"onnxruntime: provider {providers[0]} is not available (active: {active}); "
                "install the onnxruntime build that provides it"
            )
        _check_session_io(session, inputs, outputs, path)
        return OrtStep(session, inputs, outputs, f"onnxruntime step {path.name}")


def _check_session_io(session: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path) -> None:
    """The model on disk must have the I/O the manifest promises (catches a swapped file)."""
    names = {s.name for s in inputs}
    extra = [i.name for i in session.get_inputs() if i.name not in names]
    got_out = [o.name for o in session.get_outputs()]
    if extra or got_out != [s.name for s in outputs]:
        raise ArtifactError(
            f"onnxruntime: {path.name} has inputs {[i.name for i in session.get_inputs()]} and outputs "
            f"{got_out}, which do not match its manifest entry; re-export the model"
        )
