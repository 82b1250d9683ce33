"""The step program: what the compiler produces and the runtime executes.

The compile driver (:mod:`cachecompile.compile`) turns a model and a schedule into a
:class:`StepProgram`; an artifact loads into the same type (:mod:`cachecompile.runtime.artifact`);
the runtime (:class:`~cachecompile.runtime.cached.CachedTransformer`) only executes one. These
types are the contract between them, so they import nothing of ours but the schedule data.

A step graph is called as ``runner(*user_inputs, *cache_inputs, *step_inputs)`` and returns
``(*user_outputs, *cache_writes)``; :class:`StepIO` names its cache slots and per-step inputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch.utils import _pytree as pytree

from cachecompile.core.errors import InputMismatchError
from cachecompile.core.regions import RegionMap
from cachecompile.core.schedule import Schedule, StepPlan

__all__ = ["StepIO", "InputLeaf", "CallSpec", "StepProgram", "ProgramBuilder", "Runner", "timestep_index", "DECISION_SLOT"]

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
    shape, dtype and device; ``batched`` when its dimension 0 is the graphs' dynamic batch) or a
    constant that the graph was specialised on."""

    name: str
    tensor_index: int | None
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    value: Any = None
    device: str | None = None
    batched: bool = False
    index_bound: int | None = None  # its values index a table of this many rows (class labels)

    def mismatch(self, value: Any) -> str | None:
        """Why ``value`` cannot be this input of the captured graphs (``None`` when it can)."""
        if self.tensor_index is None:
            if isinstance(value, torch.Tensor) or value != self.value:
                return f"argument {self.name!r} is {_short(value)} but the graphs were captured with {_short(self.value)}"
            return None
        if not isinstance(value, torch.Tensor):
            return f"argument {self.name!r} is {_short(value)} but the graphs were captured with a tensor"
        shape = tuple(value.shape)
        fixed = self.shape[1:] if self.batched else self.shape
        if len(shape) != len(self.shape) or (shape[1:] if self.batched else shape) != fixed:
            dims = ("batch, " + ", ".join(map(str, fixed)) if self.batched else ", ".join(map(str, fixed)))
            return f"input {self.name!r} has shape {shape}, the graphs take ({dims})"
        if value.dtype != self.dtype:
            return f"input {self.name!r} is {value.dtype}, the graphs take {self.dtype}"
        if self.device is not None and str(value.device) != self.device:
            return f"input {self.name!r} is on {value.device}, the graphs run on {self.device}"
        return None

    def check_indices(self, value: torch.Tensor) -> None:
        """An index input (class labels) must lie in ``[0, index_bound)``, as eager PyTorch's
        embedding requires: every backend refuses the same values (ONNX's Gather would wrap a
        negative one)."""
        if self.index_bound is None or not value.numel():
            return
        low, high = int(value.min()), int(value.max())
        if low < 0 or high >= self.index_bound:
            bad = low if low < 0 else high
            raise IndexError(
                f"{self.name} holds {bad}, outside [0, {self.index_bound - 1}]: the model's embedding table has "
                f"{self.index_bound} rows (for class labels: the classes and the null class of guidance)"
            )


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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

    @property
    def dynamic_batch(self) -> bool:
        return any(leaf.batched for leaf in self.leaves)

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph inputs of a call, or :class:`InputMismatchError` saying how the call differs
        from the captured one (structure, constants, shapes but the batch, dtypes, devices; every
        batched input must have the same batch)."""
        if set(kwargs) == set(self.kwarg_order):  # keyword order is free in Python, not in a pytree spec
            kwargs = {k: kwargs[k] for k in self.kwarg_order}
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != self.in_spec:
            raise InputMismatchError(
                f"this call's arguments ({len(args)} positional, keywords {sorted(kwargs)}) differ from the "
                f"captured call's structure (same keywords, same None/non-None)"
            )
        tensors, batches = [], set()
        for leaf, value in zip(self.leaves, leaves):
            why = leaf.mismatch(value)
            if why is not None:
                raise InputMismatchError(why)
            if leaf.tensor_index is not None:
                leaf.check_indices(value)
                tensors.append(value)
                if leaf.batched:
                    batches.add(value.shape[0])
        if len(batches) > 1:
            raise InputMismatchError(f"the batched inputs have different batch sizes {sorted(batches)}")
        return tensors

    def batch_of(self, tensors: list[torch.Tensor]) -> int | None:
        """The batch size of a call's graph inputs (``None`` for a static batch)."""
        for leaf in self.tensor_leaves:
            if leaf.batched:
                return int(tensors[leaf.tensor_index].shape[0])
        return None


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
    open_ended: bool = False  # a generation may outrun it (a longer program then takes over)
    _dead: list[list[str]] = field(default_factory=list, repr=False, compare=False)

    @property
    def num_steps(self) -> int:
        return len(self.graph_of_step)

    def dead_after(self, step: int) -> list[str]:
        """The cache slots whose values no later step of this program reads: after ``step`` they
        are dropped, so a generation holds only what it will read (its last reads free the
        cache, and a value the next write replaces is gone before that write computes)."""
        if len(self._dead) != self.num_steps:
            self._dead[:] = _dead_after(self.io, self.graph_of_step, self.open_ended)
        return self._dead[step]

    def step_graphs(self) -> dict[StepPlan, torch.fx.GraphModule]:
        """Each distinct plan → its step graph (empty for a loaded artifact)."""
        if self.plans is None or self.graphs is None:
            return {}
        out: dict[StepPlan, torch.fx.GraphModule] = {}
        for plan, idx in zip(self.plans, self.graph_of_step):
            out.setdefault(plan, self.graphs[idx])
        return out


def _dead_after(io: list[StepIO], graph_of_step: list[int], open_ended: bool) -> list[list[str]]:
    """Per step, the slots it reads or writes whose value the next step touching the slot does
    not read (it only writes the slot) or that no later step touches (in a program that may be
    outrun, the steps after its end may read anything: a slot no later step of it touches stays)."""
    out: list[list[str]] = [[] for _ in graph_of_step]
    next_touch: dict[str, bool] = {}  # slot -> whether the next touching step (walking back) reads it
    for step in range(len(graph_of_step) - 1, -1, -1):
        step_io = io[graph_of_step[step]]
        touched = dict.fromkeys([*step_io.cache_inputs, *step_io.cache_outputs])
        out[step] = [slot for slot in touched if slot != DECISION_SLOT and not next_touch.get(slot, open_ended)]
        for slot in step_io.cache_outputs:
            next_touch[slot] = slot in step_io.cache_inputs
        for slot in step_io.cache_inputs:
            next_touch[slot] = True
    return out


class ProgramBuilder(Protocol):
    """What the runtime asks of a compiler (injected by :func:`cachecompile.optimize`, so the
    runtime never imports the compiler): the program of a call for a generation of ``num_steps``
    steps (``open_ended``: it may run longer), an artifact of a program, and its captures."""

    backend: str
    bakes_weights: bool  # the lowered graphs hold their own copy of the weights

    @property
    def captures(self) -> int: ...

    def build(self, model: torch.nn.Module, args: tuple, kwargs: dict, num_steps: int, *, open_ended: bool = False) -> StepProgram: ...

    def export(self, program: StepProgram, model: torch.nn.Module, path: Any, format: str, **options: Any) -> Any: ...

    def forget(self) -> None: ...

    def copy_without_captures(self) -> "ProgramBuilder": ...


def timestep_index(cls: type) -> int | None:
    """The positional index of ``forward``'s ``timestep`` argument (``self`` not counted), if any."""
    try:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # drop self
    except (AttributeError, TypeError, ValueError):
        return None
    return params.index("timestep") if "timestep" in params else None
