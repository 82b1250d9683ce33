"""Every family's step graphs (FORA: a full step that writes the cache, a cached step that reads
it) lowered to ONNX and run in ONNX Runtime, against the eager step graphs over a short loop.

One ONNX export per step graph costs seconds on this CPU: about 10-15 s per family here.
"""

import importlib

import pytest
import torch

import cachecompile as cc
from tests.families._common import sample

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
FAMILIES = ["pixart", "sd3", "flux", "wan"]
STEPS = 4


@pytest.mark.parametrize("family", FAMILIES)
def test_fora_step_graphs_run_in_onnxruntime(family):
    case = importlib.import_module(f"tests.families.test_{family}")
    model = getattr(case, family).__wrapped__()  # the family's fixture function, called directly
    schedule = cc.Schedule.fora(STEPS, 2)
    eager = cc.optimize(model, schedule)
    expected = sample(eager, case.X0, case.kwargs, STEPS)
    lowered = cc.optimize(model, schedule, backend="onnxruntime", optimize=False)
    for _ in range(2):
        torch.testing.assert_close(sample(lowered, case.X0, case.kwargs, STEPS), expected, rtol=0, atol=1e-5)
    assert len(lowered.step_graphs) == 2
    assert all(type(r).__name__ == "OrtStep" for r in lowered.program.runners)
