"""Each CPU backend under the real runtime: a whole cached sampling run, two generations.

FORA with interval 2 has two distinct step plans (full, cached), so each backend compiles
exactly two step graphs here; that is the whole compile budget of this module.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import cachecompile as cc
from cachecompile.compile.pipeline import concrete_shape
from cachecompile.sampling import ddim_sample
from tests.conftest import NULL_CLASS, make_dit

NUM_STEPS = 6
SAMPLE = dict(num_steps=NUM_STEPS, guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4)


@pytest.fixture(scope="module")
def model():
    return make_dit(num_layers=2)


@pytest.fixture(scope="module")
def eager_runs(model):
    """The eager cached run (the reference), for two generations with different noise."""
    cached = cc.optimize(model, cc.Schedule.fora(NUM_STEPS, 2))
    labels = torch.tensor([1, 7])
    return labels, [ddim_sample(cached, labels, seed=seed, **SAMPLE) for seed in (0, 1)]


@pytest.mark.parametrize("backend", ["inductor", "aoti", "onnxruntime"])
def test_cached_sampling_run_matches_eager(model, eager_runs, backend):
    labels, expected = eager_runs
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = sum(counters["graph_break"].values())
    lowered = cc.optimize(model, cc.Schedule.fora(NUM_STEPS, 2), backend=backend)
    for seed, reference in zip((0, 1), expected):  # two generations
        got = ddim_sample(lowered, labels, seed=seed, **SAMPLE)
        diff = (got - reference).abs().max().item()
        assert diff <= 1e-4 * reference.abs().max().item(), f"{backend}: max abs diff {diff:.3g}"
    assert len(lowered.step_graphs) == 2
    if backend == "inductor":  # one compile per distinct plan, across both generations
        # and across timestep layouts: ddim_sample passes an expanded timestep (stride 0, as
        # DiTPipeline does); a materialised one must reuse the same compiled graphs.
        assert _outputs(lowered, expand=False) == _outputs(lowered, expand=True)
        assert counters["stats"]["unique_graphs"] - graphs_before == 2
        assert sum(counters["graph_break"].values()) == breaks_before


def _outputs(cached, expand: bool) -> list[bytes]:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(NUM_STEPS)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=g)
    labels = torch.tensor([1, 7, NULL_CLASS, NULL_CLASS])
    cached.begin_generation(NUM_STEPS)
    outs = []
    for t in scheduler.timesteps:
        timestep = t.reshape(1).expand(4) if expand else torch.full((4,), int(t))
        outs.append(cached(hidden_states=x, timestep=timestep, class_labels=labels, return_dict=False)[0].numpy().tobytes())
    return outs


def test_duca_run_with_partial_recompute_on_onnxruntime(model):
    """DuCa's steps (full, token-wise partial via topk/gather/scatter, whole-stack reuse) lowered
    to ONNX agree with eager, and every step graph's ONNX passes the TensorRT operator check."""
    if not hasattr(cc.Schedule, "duca"):
        pytest.skip("this cachecompile has no Schedule.duca yet")
    import tempfile
    from pathlib import Path

    from cachecompile.backends import get_backend
    from cachecompile.backends.trt_ops import check_onnx_for_tensorrt

    schedule = cc.Schedule.duca(NUM_STEPS, 3, 0.3)
    labels = torch.tensor([1, 7])
    eager = cc.optimize(model, schedule)
    lowered = cc.optimize(model, schedule, backend="onnxruntime")
    for seed in (0, 1):
        reference = ddim_sample(eager, labels, seed=seed, **SAMPLE)
        got = ddim_sample(lowered, labels, seed=seed, **SAMPLE)
        assert (got - reference).abs().max().item() <= 1e-4 * reference.abs().max().item()
    backend = get_backend("onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        for i, gm in enumerate(lowered.step_graphs.values()):
            inputs = [torch.zeros(concrete_shape(n.meta["val"]), dtype=n.meta["val"].dtype) for n in gm.graph.find_nodes(op="placeholder")]
            inputs[: len(lowered.program.example_inputs)] = lowered.program.example_inputs
            entry = backend.export(gm, inputs, Path(tmp), f"step{i}")
            assert check_onnx_for_tensorrt(Path(tmp) / entry["files"]["onnx"]) == []
