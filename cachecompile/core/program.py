"""The step program: what the compiler produces and the runtime executes.

The compile driver (:mod:`cachecompile.compile`) turns a model and a schedule into a
:class:`StepProgram`; an artifact loads into the same type (:mod:`cachecompile.runtime.artifact`);
the runtime (:class:`~cachecompile.runtime.cached.CachedTransformer`) only executes one. These
types are the contract between them, so they import nothing of ours but the schedule data.

A step graph is called as ``runner(*user_inputs, *cache_inputs, *step_inputs)`` and returns
``(*user_outputs, *cache_writes)``; :class:`StepIO` names its cache slots and per-step inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch.utils import _pytree as pytree

from cachecompile.core.regions import RegionMap
from cachecompile.core.schedule import Schedule, StepPlan

__all__ = ["StepIO", "InputLeaf", "CallSpec", "StepProgram", "ProgramBuilder", "Runner", "DECISION_SLOT"]

Runner = Callable[..., Sequence[torch.Tensor]]

# A cache output that no step reads but the runtime keeps, per call, as it is (a device tensor,
# never read back during a generation): a 0-d boolean, True when a dynamic step (DBCache,
# TeaCache) reused instead of computing. ``cached.decisions`` reads them once, when asked.
DECISION_SLOT = "dynamic.decision"


@dataclass
class StepIO:
    """The calling convention of one step graph, ``gm(*user_inputs, *cache_inputs, *step_inputs)
    -> (*user_outputs, *cache_writes)``: the cache slots it reads, the slots it writes, and its
    per-step inputs (values that depend only on the step, e.g. a forecast weight).

    ``placeholders`` maps each cache input and step input to its placeholder node's name while
    the passes build the graph.
    """

    cache_inputs: list[str] = field(default_factory=list)
    cache_outputs: list[str] = field(default_factory=list)
    step_inputs: list[str] = field(default_factory=list)
    num_user_outputs: int | None = None
    placeholders: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"cache_inputs": list(self.cache_inputs), "cache_outputs": list(self.cache_outputs),
                "step_inputs": list(self.step_inputs)}

    @classmethod
    def from_json(cls, d: Any, num_user_outputs: int) -> "StepIO":
        return cls([str(s) for s in d["cache_inputs"]], [str(s) for s in d["cache_outputs"]],
                   [str(s) for s in d["step_inputs"]], num_user_outputs)


@dataclass(frozen=True)
class InputLeaf:
    """One flattened input of the captured call: a tensor (its position in the graph's inputs,
    shape and dtype) or a constant that the graph was specialised on."""

    name: str
    tensor_index: int | None
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    value: Any = None


@dataclass
class CallSpec:
    """How the model was called when it was captured, and how its outputs are rebuilt:
    the pytree structures of the call and of the output, every flattened input (tensors and the
    constants the graphs were specialised on), the keyword order, and where ``timestep`` is."""

    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    leaves: list[InputLeaf]
    num_outputs: int
    kwarg_order: tuple[str, ...] = ()
    model_class: str = ""
    timestep_arg: int | None = None  # positional index of ``timestep``, when the model has one

    @property
    def tensor_leaves(self) -> list[InputLeaf]:
        return [leaf for leaf in self.leaves if leaf.tensor_index is not None]


@dataclass
class StepProgram:
    """Everything the runtime needs to replay a schedule: one runner per distinct step plan with
    its I/O, which runner each step uses, and the per-step input values (computed up front, one
    per step, ``None`` where a step's graph does not take that input).

    ``graphs``, ``plans``, ``region_map`` and ``example_inputs`` (the captured call's tensors)
    are there for a program compiled in this process (inspection and export); a program loaded
    from an artifact has no graphs.
    """

    call: CallSpec
    runners: list[Runner]
    io: list[StepIO]
    graph_of_step: list[int]
    step_values: dict[str, list[torch.Tensor | None]]
    schedule: Schedule
    backend: str
    reuses_outputs: bool = False  # a runner overwrites its outputs on the next call (CUDA graphs)
    plans: list[StepPlan] | None = None
    graphs: list[torch.fx.GraphModule] | None = None
    region_map: RegionMap | None = None
    example_inputs: list[torch.Tensor] | None = None
    device: torch.device | None = None  # set for loaded artifacts: they run where they were exported
    dtype: torch.dtype | None = None
    source: str | None = None  # the artifact directory, for messages

    @property
    def num_steps(self) -> int:
        return len(self.graph_of_step)

    def step_graphs(self) -> dict[StepPlan, torch.fx.GraphModule]:
        """Each distinct plan → its step graph (empty for a loaded artifact)."""
        if self.plans is None or self.graphs is None:
            return {}
        out: dict[StepPlan, torch.fx.GraphModule] = {}
        for plan, idx in zip(self.plans, self.graph_of_step):
            out.setdefault(plan, self.graphs[idx])
        return out


class ProgramBuilder(Protocol):
    """What the runtime asks of a compiler (injected by :func:`cachecompile.optimize`, so the
    runtime never imports the compiler): a program for a call, and an artifact of a program."""

    backend: str

    def build(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> StepProgram: ...

    def export(self, program: StepProgram, model: torch.nn.Module, path: Any, format: str, **options: Any) -> Any: ...
