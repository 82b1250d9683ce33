"""Low-precision cache storage through ONNX Runtime: the casts export as ONNX ``Cast`` nodes and
the bfloat16/float16 cache is bound as graph I/O like any other; the run agrees with eager."""

from __future__ import annotations

import pytest
import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample
from tests.conftest import NULL_CLASS, make_dit

pytest.importorskip("onnxruntime")

STEPS = 5
SAMPLE = dict(num_steps=STEPS, guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4, seed=0)


def stored_dtypes(cached, labels):
    """A generation of ``cached``, and the dtypes of every value its cache store was given."""
    dtypes, write = set(), cached._store.write

    def recording(call, slot, value):
        dtypes.add(value.dtype)
        write(call, slot, value)

    cached._store.write = recording
    return ddim_sample(cached, labels, **SAMPLE), dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_onnxruntime_agrees_with_eager(dtype):
    model = make_dit(num_layers=2)
    labels = torch.tensor([2, 5])
    schedule = cc.Schedule.fora(STEPS, 2, cache_dtype=dtype)
    eager = cc.optimize(model, schedule)
    expected = ddim_sample(eager, labels, **SAMPLE)
    ort = cc.optimize(model, schedule, backend="onnxruntime")
    got, dtypes = stored_dtypes(ort, labels)
    # ONNX Runtime's float32 kernels differ from eager's by about 1e-7 relative; where that moves a
    # cached value across a rounding boundary of the storage dtype, the stored value differs by
    # one of its units (2^-8 relative for bfloat16): single elements move, the whole run does not.
    rel_l1 = ((got - expected).abs().mean() / expected.abs().mean()).item()
    assert rel_l1 <= 1e-4, rel_l1
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
    assert ort.cache_bytes == eager.cache_bytes
    assert dtypes == {dtype}


def test_an_onnx_artifact_keeps_the_storage_dtype(tmp_path):
    model = make_dit(num_layers=2)
    labels = torch.tensor([1, 2])
    cached = cc.optimize(model, cc.Schedule.fora(STEPS, 2, cache_dtype=torch.bfloat16))
    expected = ddim_sample(cached, labels, **SAMPLE)
    loaded = cc.load(cached.export(tmp_path / "fora-bf16", format="onnx"))
    assert loaded.schedule == cached.schedule and loaded.schedule.cache_dtype == "bfloat16"
    got, dtypes = stored_dtypes(loaded, labels)
    assert ((got - expected).abs().mean() / expected.abs().mean()).item() <= 1e-4
    assert loaded.cache_bytes == cached.cache_bytes
    assert dtypes == {torch.bfloat16}
