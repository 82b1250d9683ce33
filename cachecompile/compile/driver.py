"""The compile driver: capture → regions → plan → rewrite → lower, into one :class:`StepProgram`.

:class:`Compiler` is what :func:`cachecompile.optimize` hands the runtime (it implements
:class:`~cachecompile.core.program.ProgramBuilder`): on the first call the runtime asks it for
the program of that call, and for an artifact on ``cached.export``. The flow runs one way:

1. capture: non-strict ``torch.export`` on the call (:mod:`cachecompile.passes.capture`);
2. regions: from module paths (:mod:`cachecompile.passes.regions`);
3. plan: the schedule resolved on the model's layout, one plan per step; equal plans share a graph;
4. rewrite: :data:`~cachecompile.compile.pipeline.STEP_PASSES` per distinct plan, then the
   schedule-wide passes (:func:`~cachecompile.compile.pipeline.finish_step_graphs`);
5. lower: each step graph through the backend (:mod:`cachecompile.backends`);
6. per-step inputs: every value a step graph takes besides the call and the cache, computed
   here for every step by the method that added it (:func:`cachecompile.methods.step_values`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from cachecompile import methods
from cachecompile.backends import check_options
from cachecompile.core.program import StepIO, StepProgram
from cachecompile.core.regions import RegionPatterns
from cachecompile.core.schedule import Schedule, StepPlan
from cachecompile.compile.export import export_program
from cachecompile.compile.pipeline import build_step_graph, example_inputs, finish_step_graphs
from cachecompile.passes.cache_io import cache_io
from cachecompile.passes.capture import capture
from cachecompile.passes.regions import find_regions

log = logging.getLogger(__name__)

__all__ = ["Compiler"]


class Compiler:
    """Builds the step program of a model under ``schedule`` for ``backend``.

    The backend and its options are checked here, when :func:`cachecompile.optimize` is called:
    an unknown backend, a missing optional dependency or an unknown option fails before any
    capture.
    """

    def __init__(
        self,
        schedule: Schedule,
        backend: str = "eager",
        *,
        regions: RegionPatterns | None = None,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.schedule = schedule
        self.options = dict(backend_options or {})
        self._backend = check_options(backend, self.options)
        self.backend = self._backend.name
        self.patterns = regions

    def build(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> StepProgram:
        """Capture ``model(*args, **kwargs)``, rewrite one step graph per distinct plan and lower
        each; all or nothing."""
        captured = capture(model, args, kwargs)
        region_map = find_regions(captured.gm, self.patterns, captured.call.model_class)
        plans = self.schedule.resolve(region_map.layout)
        distinct: dict[StepPlan, int] = {}
        graph_of_step = [distinct.setdefault(p, len(distinct)) for p in plans]
        graphs = [build_step_graph(captured.gm, region_map, p) for p in distinct]
        finish_step_graphs(graphs, graph_of_step)  # schedule-wide: dead cache writes, then what they free
        examples = list(captured.example_inputs)
        runners = [self._backend.compile(gm, example_inputs(gm, examples), **self.options) for gm in graphs]
        ios = [_finished_io(gm) for gm in graphs]
        device = _device_of(model, examples)
        program = StepProgram(
            call=captured.call,
            runners=runners,
            io=ios,
            graph_of_step=graph_of_step,
            step_values=_step_values(self.schedule, plans, ios, graph_of_step, device),
            schedule=self.schedule,
            backend=self.backend,
            # CUDA-graph runners overwrite their outputs on the next call: the store copies them.
            reuses_outputs=any(getattr(r, "reuses_outputs", False) for r in runners),
            plans=plans,
            graphs=graphs,
            region_map=region_map,
            example_inputs=examples,
        )
        log.info("cachecompile: %d steps → %d step graphs (%s)", len(plans), len(graphs), self.backend)
        return program

    def export(self, program: StepProgram, model: torch.nn.Module, path: Any, format: str, **options: Any) -> Path:
        """Write ``program``'s step graphs as an artifact (see :mod:`cachecompile.compile.export`)."""
        return export_program(program, model, path, format, **options)


def _finished_io(gm: torch.fx.GraphModule) -> StepIO:
    io = cache_io(gm)
    return StepIO(list(io.cache_inputs), list(io.cache_outputs), list(io.step_inputs), io.num_user_outputs)


def _device_of(model: torch.nn.Module, examples: list[torch.Tensor]) -> torch.device:
    first = next(iter(model.parameters()), None)
    if first is not None:
        return first.device
    return examples[0].device if examples else torch.device("cpu")


def _step_values(
    schedule: Schedule, plans: list[StepPlan], ios: list[StepIO], graph_of_step: list[int], device: torch.device
) -> dict[str, list[torch.Tensor | None]]:
    """Each per-step input's value at every step whose graph takes it (``None`` elsewhere)."""
    names = sorted({n for io in ios for n in io.step_inputs})
    values = methods.step_values(schedule, plans, names, device)
    return {
        name: [values[name][s] if name in ios[g].step_inputs else None for s, g in enumerate(graph_of_step)]
        for name in names
    }
