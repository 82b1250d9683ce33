"""The compile driver: capture → regions → plan → rewrite → lower, into one :class:`StepProgram`.

:class:`Compiler` is what :func:`cachecompile.optimize` hands the runtime (it implements
:class:`~cachecompile.core.program.ProgramBuilder`): at the start of each generation the runtime
asks it for the program of that call and that generation's length, and for an artifact on
``cached.export``. The flow runs one way:

1. capture: non-strict ``torch.export`` on the call, the batch dimension symbolic
   (:mod:`cachecompile.passes.capture`); one capture per input signature that differs in more
   than the batch (resolution, dtype, device ...), at most ``max_captures`` of them;
2. regions: from module paths (:mod:`cachecompile.passes.regions`);
3. plan: the schedule bound to the generation's length and resolved on the model's layout, one
   plan per step; equal plans share a graph;
4. rewrite: :data:`~cachecompile.compile.pipeline.STEP_PASSES` per distinct plan (kept per
   capture, so every step count reuses them), then the schedule-wide passes
   (:func:`~cachecompile.compile.pipeline.finish_step_graphs`) on this program's copies;
5. lower: each finished step graph through the backend, once per distinct graph: programs of
   different lengths share their lowered graphs;
6. per-step inputs: every value a step graph takes besides the call and the cache, computed
   here for every step by the method that added it (:func:`cachecompile.methods.step_values`).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.fx.experimental.symbolic_shapes import optimization_hint

from cachecompile import methods
from cachecompile.backends import check_options
from cachecompile.compile.export import export_program
from cachecompile.compile.pipeline import build_step_graph, example_inputs, finish_step_graphs
from cachecompile.core.errors import InputMismatchError
from cachecompile.core.program import Runner, StepIO, StepProgram
from cachecompile.core.regions import RegionPatterns
from cachecompile.core.schedule import Schedule, StepPlan
from cachecompile.passes import copy_graph_module
from cachecompile.passes.cache_io import cache_io
from cachecompile.passes.capture import Captured, capture
from cachecompile.passes.regions import find_regions

log = logging.getLogger(__name__)

__all__ = ["Compiler", "DEFAULT_MAX_CAPTURES"]

# Like torch._dynamo's cache size limit: how many input signatures one optimized model captures.
DEFAULT_MAX_CAPTURES = 8

# torch.export and the lowering are not thread-safe (export patches the modules it traces, and
# two optimized models may hold one model): one capture or build at a time in a process.
_BUILD_LOCK = threading.RLock()


class Compiler:
    """Builds the step programs of a model under ``schedule`` for ``backend``.

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
        dynamic_batch: bool = True,
        max_captures: int = DEFAULT_MAX_CAPTURES,
    ) -> None:
        self.schedule = schedule
        self.options = dict(backend_options or {})
        self._backend = check_options(backend, self.options)
        self.backend = self._backend.name
        # Whether the lowered graphs hold their own copy of the weights (an in-place weight
        # update then needs a new build; the eager and Inductor graphs read the model's tensors).
        self.bakes_weights = bool(getattr(self._backend, "bakes_weights", False))
        self.patterns = regions
        self.dynamic_batch = dynamic_batch
        if isinstance(max_captures, bool) or not isinstance(max_captures, int) or max_captures < 1:
            raise ValueError(f"max_captures must be an integer >= 1, got {max_captures!r}")
        self.max_captures = max_captures
        self._captures: list[_Capture] = []

    @property
    def captures(self) -> int:
        """How many input signatures are captured now."""
        return len(self._captures)

    def forget(self) -> None:
        """Drop every capture (the model changed: its weights, modules or mode)."""
        self._captures.clear()

    def copy_without_captures(self) -> "Compiler":
        """The same settings and no capture (for a copy of the optimized model)."""
        new = copy.copy(self)
        new._captures = []
        return new

    def build(
        self, model: torch.nn.Module, args: tuple, kwargs: dict, num_steps: int, *, open_ended: bool = False
    ) -> StepProgram:
        """The program of the call ``model(*args, **kwargs)`` for a generation of ``num_steps``
        steps. ``open_ended``: the generation may run longer (its length is not known), so cache
        writes at its last steps are kept for the steps that may follow."""
        with _BUILD_LOCK:
            return self._capture_for(model, args, kwargs).program(num_steps, open_ended)

    def cache_slots(
        self, model: torch.nn.Module, args: tuple, kwargs: dict, num_steps: int, *, open_ended: bool = False
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each cache slot the program of ``model(*args, **kwargs)`` for ``num_steps`` steps
        writes, with the shape (at this call's batch size) and dtype of its value: the step
        graphs are built as for running (captured on fake tensors by ``torch.export``), not
        lowered and not run."""
        with _BUILD_LOCK:
            cap = self._capture_for(model, args, kwargs)
            batch = cap.call.batch_of(cap.call.tensors(args, kwargs))
            return cap.cache_slots(num_steps, open_ended, batch)

    def export(self, program: StepProgram, model: torch.nn.Module, path: Any, format: str, **options: Any) -> Path:
        """Write ``program``'s step graphs as an artifact (see :mod:`cachecompile.compile.export`)."""
        return export_program(program, model, path, format, **options)

    def _capture_for(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> "_Capture":
        reasons = []
        for cap in self._captures:
            try:
                cap.call.tensors(args, kwargs)
            except InputMismatchError as e:
                reasons.append(str(e))
                continue
            self._captures.remove(cap)  # most recently used last
            self._captures.append(cap)
            return cap
        if len(self._captures) >= self.max_captures:
            raise InputMismatchError(
                f"this call differs from all {len(self._captures)} captured input signatures ({reasons[-1]}), and "
                f"max_captures={self.max_captures} are kept; pass a larger max_captures to cachecompile.optimize, "
                f"or call the model with fewer distinct resolutions, dtypes or devices"
            )
        if reasons:
            log.info("cachecompile: capturing again (%s)", reasons[-1])
        cap = _Capture(self, capture(model, args, kwargs, dynamic_batch=self.dynamic_batch), model)
        self._captures.append(cap)
        return cap


class _Capture:
    """One captured input signature: its regions, its step graphs per plan (before the
    schedule-wide passes), its lowered graphs, and its programs per generation length."""

    def __init__(self, compiler: Compiler, captured: Captured, model: torch.nn.Module) -> None:
        self.compiler = compiler
        self.captured = captured
        self.call = captured.call
        self.region_map = find_regions(captured.gm, compiler.patterns, captured.call.model_class)
        self.device = _device_of(model, captured.example_inputs)
        self._rewritten: dict[StepPlan, torch.fx.GraphModule] = {}
        self._lowered: dict[tuple, tuple[torch.fx.GraphModule, Runner, StepIO]] = {}
        self._programs: dict[tuple[int, bool], StepProgram] = {}

    def program(self, num_steps: int, open_ended: bool) -> StepProgram:
        key = (num_steps, open_ended)
        if key not in self._programs:
            self._programs[key] = self._build(num_steps, open_ended)
        return self._programs[key]

    def _finished(self, num_steps: int, open_ended: bool) -> _Finished:
        """The finished step graphs of a program of ``num_steps`` steps, before lowering. An
        open-ended one is resolved for twice as many steps and cut: its cache writes are kept
        where the steps that may follow read them, and its graphs are the ones every longer
        program uses."""
        c = self.compiler
        schedule = c.schedule.bind(2 * num_steps if open_ended else num_steps)
        plans = schedule.resolve(self.region_map.layout)
        distinct: dict[StepPlan, int] = {}
        graph_of_step = [distinct.setdefault(p, len(distinct)) for p in plans]
        graphs = [self._copy(self._rewrite(p)) for p in distinct]
        # schedule-wide: dead cache writes of this program, then what they free, then the storage dtype
        finish_step_graphs(graphs, graph_of_step, self.region_map, schedule.cache_dtype)
        if open_ended:
            plans, graph_of_step = plans[:num_steps], graph_of_step[:num_steps]
            used = sorted(set(graph_of_step))
            distinct = {p: i for i, p in enumerate(p for p in distinct if distinct[p] in used)}
            graphs = [graphs[i] for i in used]
            graph_of_step = [used.index(g) for g in graph_of_step]
            schedule = c.schedule.bind(num_steps)  # open-ended: the compiler's schedule has no step count
        return _Finished(schedule, plans, list(distinct), graphs, graph_of_step)

    def cache_slots(self, num_steps: int, open_ended: bool, batch: int | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every cache slot a program of ``num_steps`` steps writes, with the shape and dtype of
        its value at batch size ``batch`` (the graphs' dynamic batch; ``None`` for the captured
        one): what the runtime's cache store holds for each call of a step."""
        f = self._finished(num_steps, open_ended)
        used = set(f.graph_of_step)
        slots: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for i, gm in enumerate(f.graphs):
            if i not in used:
                continue
            io = cache_io(gm)
            values = gm.graph.output_node().args[0][io.num_user_outputs:]
            for slot, node in zip(io.cache_outputs, values):
                val = node.meta["val"]
                slots[slot] = (_sizes(val.shape, batch), val.dtype)
        return slots

    def _build(self, num_steps: int, open_ended: bool) -> StepProgram:
        """A program of ``num_steps`` steps (see :meth:`_finished`), lowered."""
        c = self.compiler
        f = self._finished(num_steps, open_ended)
        schedule, plans, graphs, graph_of_step = f.schedule, f.plans, f.graphs, f.graph_of_step
        lowered = [self._lower(plan, gm) for plan, gm in zip(f.distinct, graphs)]
        ios = [io for _, _, io in lowered]
        runners = [runner for _, runner, _ in lowered]
        program = StepProgram(
            call=self.call,
            runners=runners,
            io=ios,
            graph_of_step=graph_of_step,
            step_values=_step_values(schedule, plans, ios, graph_of_step, self.device),
            schedule=schedule,
            backend=c.backend,
            # CUDA-graph runners overwrite their outputs on the next call: the store copies them.
            reuses_outputs=any(getattr(r, "reuses_outputs", False) for r in runners),
            open_ended=open_ended,
            plans=plans,
            graphs=[gm for gm, _, _ in lowered],
            region_map=self.region_map,
            example_inputs=list(self.captured.example_inputs),
        )
        _check_reads_follow_writes(program)
        log.info("cachecompile: %d steps → %d step graphs (%s)", len(plans), len(graphs), c.backend)
        return program

    def _rewrite(self, plan: StepPlan) -> torch.fx.GraphModule:
        if plan not in self._rewritten:
            self._rewritten[plan] = build_step_graph(self.captured.gm, self.region_map, plan)
        return self._rewritten[plan]

    @staticmethod
    def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """A copy a program's schedule-wide passes may change, with its calling convention."""
        new = copy_graph_module(gm)
        io = cache_io(gm)
        new.meta["cachecompile"] = StepIO(
            list(io.cache_inputs), list(io.cache_outputs), list(io.step_inputs), io.num_user_outputs, dict(io.placeholders)
        )
        new.recompile()
        return new

    def _lower(self, plan: StepPlan, gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, Runner, StepIO]:
        """The lowered graph for ``plan`` with ``gm``'s calling convention: lowered once, shared by
        every program whose schedule-wide passes left the plan's graph the same."""
        io = cache_io(gm)
        key = (plan, tuple(io.cache_inputs), tuple(io.cache_outputs), tuple(io.step_inputs))
        if key not in self._lowered:
            c = self.compiler
            runner = c._backend.compile(gm, example_inputs(gm, list(self.captured.example_inputs)), **c.options)
            self._lowered[key] = (gm, runner, StepIO(list(io.cache_inputs), list(io.cache_outputs), list(io.step_inputs),
                                                     io.num_user_outputs))
        return self._lowered[key]


@dataclass
class _Finished:
    """A program's step graphs after the schedule-wide passes: ``graphs[i]`` is ``distinct[i]``'s."""

    schedule: Schedule
    plans: list[StepPlan]
    distinct: list[StepPlan]
    graphs: list[torch.fx.GraphModule]
    graph_of_step: list[int]


def _sizes(shape: Any, batch: int | None) -> tuple[int, ...]:
    """A (fake) value's sizes, each symbolic one (the dynamic batch is the graphs' only symbol)
    at ``batch``, or at its captured example value when ``batch`` is None."""
    out = []
    for d in shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            out.append(int(expr.xreplace({sym: batch for sym in expr.free_symbols})) if batch is not None else int(optimization_hint(d)))
        else:
            out.append(int(d))
    return tuple(out)


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


def _check_reads_follow_writes(program: StepProgram) -> None:
    """Every cache slot a step reads was written by an earlier step of the program."""
    written: set[str] = set()
    for step, g in enumerate(program.graph_of_step):
        missing = [s for s in program.io[g].cache_inputs if s not in written]
        if missing:  # pragma: no cover - the schedule resolution and the dead-write pass rule it out
            raise RuntimeError(f"step {step} reads cache slot(s) {missing} that no earlier step writes (a bug: please report it)")
        written.update(program.io[g].cache_outputs)
