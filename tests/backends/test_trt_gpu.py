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

# The eager references in float32 proper: cuDNN convolutions default to TF32 on Ampere and newer.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# fp32 engines are built without TF32 (relative max-abs error, as `close` measures it); half
# precision inside a float32 graph is looser. First guesses: tighten after the first GPU run.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}


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
    # not only the first argument: a CPU cache tensor would be bound as a device pointer
    with pytest.raises(ValueError, match=r"input cache\.block0 is on cpu"):
        step(*cuda_step.inputs[:-1], cuda_step.inputs[-1].cpu())


def test_unaligned_input_gives_the_aligned_result(engine_dir, cuda_step, close):
    """set_tensor_address needs 256-byte alignment; a contiguous slice keeps an unaligned address."""
    step = get_backend("tensorrt").load(*engine_dir)
    x = cuda_step.inputs[0]
    raw = torch.empty(x.numel() + 64, dtype=x.dtype, device=x.device)
    unaligned = raw[2:2 + x.numel()].view(x.shape).copy_(x)
    assert unaligned.is_contiguous() and unaligned.data_ptr() % 256
    expected = step(*cuda_step.inputs)
    close(step(unaligned, *cuda_step.inputs[1:]), expected, rel=0)


def test_user_stream_and_default_stream_agree(engine_dir, cuda_step, close):
    step = get_backend("tensorrt").load(*engine_dir)
    on_default = step(*cuda_step.inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_user = step(*cuda_step.inputs)
    torch.cuda.current_stream().wait_stream(stream)
    close(on_user, on_default, rel=0)


def test_float64_inputs_are_refused(tmp_path):
    """TensorRT's parser makes a DOUBLE input FLOAT: float64 data would be read as float32."""
    from cachecompile.backends import BackendCompileError
    from tests.backends.conftest import flat_step_graph

    x = torch.randn(2, 4, dtype=torch.float64, device="cuda")
    gm = flat_step_graph(torch.nn.Linear(4, 4).double().cuda(), (x,))
    with pytest.raises(BackendCompileError, match="float64"):
        get_backend("tensorrt").export(gm, (x,), tmp_path, "step0")


def test_timing_cache_is_shared_across_step_graphs(cuda_step, tmp_path):
    backend = get_backend("tensorrt")
    names = dict(input_names=cuda_step.input_names, output_names=cuda_step.output_names)
    backend.export(cuda_step.gm, cuda_step.inputs, tmp_path, "step0", **names)
    first = (tmp_path / "timing.cache").stat().st_size
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # a refused (mismatched) cache would warn
        backend.export(cuda_step.gm, cuda_step.inputs, tmp_path, "step1", **names)
    assert first > 0 and (tmp_path / "timing.cache").stat().st_size >= first


def test_torch_tensorrt_path(cuda_step, close, tmp_path):
    pytest.importorskip("torch_tensorrt", reason="torch-tensorrt is not installed")
    backend = get_backend("tensorrt")
    entry = backend.export(cuda_step.gm, cuda_step.inputs, tmp_path, "step0", via="torch_tensorrt")
    step = backend.load(tmp_path, entry)
    close(tuple(step(*cuda_step.inputs)), cuda_step.expected, rel=TOLERANCE["fp32"])
