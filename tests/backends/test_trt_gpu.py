"""TensorRT engines: build, serialize, load, run on CUDA tensors. Needs TensorRT and a GPU.

Skipped on the project's CPU machines, where neither exists (TensorRT's PyPI packages fetch
their libraries from NVIDIA's own index, which these machines cannot reach).
"""

from __future__ import annotations

import json

import pytest
import torch

trt = pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed: pip install 'cachecompile[tensorrt]' on a CUDA machine"
)
if not torch.cuda.is_available():
    pytest.skip("TensorRT engines need a CUDA GPU; none is available", allow_module_level=True)

from cachecompile.backends import ArtifactError, get_backend  # noqa: E402

# TensorRT may use TF32 for float32 layers; half precision is looser still.
TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2, "bf16": 1e-1}


@pytest.fixture(scope="module")
def cuda_step(dit_step_builder):
    return dit_step_builder("cuda")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, cuda_step):
    directory = tmp_path_factory.mktemp("trt")
    entry = get_backend("tensorrt").export(
        cuda_step.gm, cuda_step.inputs, directory, "step0",
        input_names=cuda_step.input_names, output_names=cuda_step.output_names,
    )
    (directory / "entry.json").write_text(json.dumps(entry))
    return directory, entry


def test_export_writes_onnx_engine_and_timing_cache(engine_dir):
    directory, entry = engine_dir
    assert (directory / entry["files"]["onnx"]).is_file()
    assert (directory / entry["files"]["engine"]).is_file()
    assert (directory / "timing.cache").stat().st_size > 0
    assert entry["versions"]["tensorrt"] == trt.__version__
    assert entry["device"]["capability"] == list(torch.cuda.get_device_capability())


def test_engine_matches_eager_on_cuda(engine_dir, cuda_step, close):
    step = get_backend("tensorrt").load(*engine_dir)
    close(step(*cuda_step.inputs), cuda_step.expected, rel=TOLERANCE["fp32"])
    inputs = cuda_step.other_inputs(4)
    out = step(*inputs)
    assert all(o.is_cuda for o in out)
    close(out, cuda_step.reference(inputs), rel=TOLERANCE["fp32"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("typing", ["weak", "strong"])
def test_reduced_precision_engines(cuda_step, close, precision, typing):
    if typing == "weak" and not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip("this TensorRT has no weak typing (removed in TensorRT 11)")
    step = get_backend("tensorrt").compile(
        cuda_step.gm, cuda_step.inputs, precision=precision, typing=typing,
        input_names=cuda_step.input_names, output_names=cuda_step.output_names,
    )
    close(step(*cuda_step.inputs), cuda_step.expected, rel=TOLERANCE[precision])


def test_engine_from_another_tensorrt_or_gpu_is_refused(engine_dir):
    directory, entry = engine_dir
    other = json.loads(json.dumps(entry))
    other["versions"]["tensorrt"] = "8.6.1"
    with pytest.raises(ArtifactError, match="tensorrt 8.6.1"):
        get_backend("tensorrt").load(directory, other)
    other = json.loads(json.dumps(entry))
    other["device"]["capability"] = [1, 0]
    with pytest.raises(ArtifactError, match="compute capability"):
        get_backend("tensorrt").load(directory, other)


def test_cpu_tensors_are_refused(engine_dir, cuda_step):
    step = get_backend("tensorrt").load(*engine_dir)
    with pytest.raises(ValueError, match="CUDA tensors"):
        step(*(t.cpu() for t in cuda_step.inputs))


def test_torch_tensorrt_path(cuda_step, close, tmp_path):
    pytest.importorskip("torch_tensorrt", reason="torch-tensorrt is not installed")
    backend = get_backend("tensorrt")
    entry = backend.export(cuda_step.gm, cuda_step.inputs, tmp_path, "step0", via="torch_tensorrt")
    step = backend.load(tmp_path, entry)
    close(tuple(step(*cuda_step.inputs)), cuda_step.expected, rel=TOLERANCE["fp32"])
