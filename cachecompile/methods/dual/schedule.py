"""Dual caching: ToCa (token-wise partial recompute) and DuCa (aggressive + conservative steps).

Step ``s`` of a schedule with interval ``N``:

* **ToCa** — ``s % N == 0``: full. Other steps: every block's attention is reused and its MLP
  is recomputed for the ``k = round(fresh_ratio × tokens)`` top-scoring tokens only (halves
  round up), the other rows come from the MLP cache (a :class:`Partial` action). Other branches
  a family may have (cross-attention) are reused like the attention. Tokens are picked per
  sample: with CFG as one batched call every row of the CFG batch gets its own top-k.
* **DuCa** — ``s % N == 0``: full. ``(s % N)`` odd: *conservative* (a ToCa step). ``(s % N)``
  even: *aggressive*, the whole block stack is reused: ``aggressive_reuse="output"`` takes the
  stack's cached output (the paper), ``"residual"`` adds the cached (output − input) to this
  step's stack input (a :class:`ReuseResidual` action). Embedding, final norm, output head and
  adaLN gates are outside the cached regions, so they are always recomputed. The stack cache is
  written at every step where the stack runs (full and conservative steps).

Token scores (``score=``, one name or a weighted sum such as ``"v_norm+0.25*staleness"``) are
computed inside the step graphs by :mod:`cachecompile.methods.dual.scores`; see there for what each score
means, the direction of ``v_norm`` and the cost of ``attention``. Scores that need state from an
earlier step (the value norms or attention of the last step that computed a block's attention,
the step at which each token was last recomputed, the stack's input for ``"residual"``) get it
from a :class:`Record` action: "compute this region and keep that state", attached by
:func:`attach_state` (a rule transform, so explicit schedules with partial actions work too).

``fresh_ratio`` is a number, a per-block list, or a per-step × per-block table (ToCa and DuCa
vary it with depth and time; :func:`toca_profile` builds ToCa's profile). It is data: it is
saved in the schedule file. Every distinct ratio is its own step plan (k is static per plan, so
shapes stay static): a constant ratio gives 2 step graphs for ToCa and 3 for DuCa.

Example::

    >>> import cachecompile as cc
    >>> s = cc.Schedule.duca(num_steps=6, interval=3, fresh_ratio=0.3)
    >>> s.step_kinds()
    ['full', 'conservative', 'aggressive', 'full', 'conservative', 'aggressive']
    >>> cc.Schedule.loads(s.dumps()) == s
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from cachecompile.core.schedule import (
    COMPUTE,
    REUSE,
    Action,
    Layout,
    Method,
    Schedule,
    ScheduleError,
    StepPlan,
    check_int,
    json_fields,
    register_action,
    state_tokens,
    register_method,
    register_rule_transform,
)
from cachecompile.methods.reuse import check_params

__all__ = [
    "Partial",
    "Record",
    "ReuseResidual",
    "SCORE_NAMES",
    "STEP_INPUT",
    "parse_score",
    "toca_profile",
    "attach_state",
    "tokens_to_recompute",
    "step_values",
]

# Scores the graph pass knows (cachecompile.methods.dual.scores). v_norm and attention read state recorded
# at the block's last attention compute; staleness reads the region's own recompute stamps.
SCORE_NAMES = ("attention", "random", "staleness", "v_norm")
_ATTENTION_STATE = ("attention", "v_norm")
AGGRESSIVE_MODES = ("output", "residual")

Score = tuple[tuple[str, float], ...]


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Partial(Action):
    """Recompute the region for the ``round(ratio × tokens)`` top-scoring tokens of each sample;
    the other token rows are read from the region's cache. The merged tensor is written back.

    >>> Partial(ratio=0.25, score=parse_score("v_norm+0.5*staleness")).to_json()["score"]
    {'staleness': 0.5, 'v_norm': 1.0}
    """

    kind: str = "partial"
    ratio: float = 0.0
    score: Score = (("v_norm", 1.0),)
    seed: int = 0
    # Re-stamp the recomputed tokens' staleness although this step's score does not use it:
    # set by :func:`attach_state` when another step scores the region by staleness.
    restamp: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        object.__setattr__(self, "score", parse_score(self.score))
        object.__setattr__(self, "seed", check_int("seed", self.seed, minimum=0))
        if not isinstance(self.restamp, bool):
            raise ScheduleError(f"a partial action's restamp is true or false, got {self.restamp!r}")

    @property
    def stamps(self) -> bool:
        """Whether this step writes the staleness stamps of the tokens it recomputes."""
        return self.restamp or any(name == "staleness" for name, _ in self.score)

    def to_json(self) -> Any:
        out = {"kind": "partial", "ratio": self.ratio, "score": dict(self.score), "seed": self.seed}
        if self.restamp:
            out["restamp"] = True
        return out


@dataclass(frozen=True)
class Record(Action):
    """Compute the region (kind ``compute``) and also keep ``state`` for later steps:
    ``v_norm`` / ``attention`` (attention regions), ``staleness`` (partial regions),
    ``residual`` (the stack: output − input, in the slot ``stack@residual``)."""

    kind: str = "compute"
    state: tuple[str, ...] = ()

    def to_json(self) -> Any:
        return {"kind": "record", "state": list(self.state)}


@dataclass(frozen=True)
class ReuseResidual(Action):
    """Reuse a region as this step's input + the cached (output − input) (DuCa ``"residual"``)."""

    kind: str = "residual"


# The per-step graph input the scores of :mod:`.scores` read: the sampling-step index (the
# ``random`` score hashes it, ``staleness`` stamps recomputed tokens with it).
STEP_INPUT = "step"


def step_values(plans: list[StepPlan], names: list[str], device: torch.device) -> dict[str, list[torch.Tensor]]:
    """The values of this method's per-step graph inputs among ``names``, one per step."""
    if STEP_INPUT not in names:
        return {}
    return {STEP_INPUT: [torch.tensor(step, dtype=torch.int64, device=device) for step in range(len(plans))]}


def _partial_from_json(obj: Any) -> Partial:
    o = json_fields(obj, "a partial action", required=("ratio",), optional=("score", "seed", "restamp"))
    return Partial(ratio=o["ratio"], score=parse_score(o.get("score", "v_norm")), seed=o.get("seed", 0), restamp=o.get("restamp", False))


def _record_from_json(obj: Any) -> Record:
    o = json_fields(obj, "a record action", optional=("state",))
    return Record(state=state_tokens(o.get("state", ()), "a record action's state"))


def _residual_from_json(obj: Any) -> ReuseResidual:
    if not isinstance(obj, str):
        json_fields(obj, "a residual action")
    return ReuseResidual()


register_action("partial", _partial_from_json)
register_action("record", _record_from_json)
register_action("residual", _residual_from_json)


# --------------------------------------------------------------------------- parameters


def check_ratio(value: Any, where: str = "fresh_ratio") -> float:
    """A fresh ratio as a float in [0, 1], or a :class:`ScheduleError` naming the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ScheduleError(f"{where} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ScheduleError(
            f"{where} must be in [0, 1] (the fraction of tokens recomputed at a conservative step), "
            f"got {value!r}"
        )
    return float(value)


def tokens_to_recompute(ratio: float, tokens: int) -> int:
    """``k = round(ratio × tokens)``, halves rounded up (not to even), within [0, tokens].

    >>> tokens_to_recompute(0.3, 16), tokens_to_recompute(0.5, 5), tokens_to_recompute(1.0, 7)
    (5, 3, 7)
    """
    return max(0, min(tokens, int(math.floor(ratio * tokens + 0.5))))


_TERM = re.compile(r"^\s*([-+]?)\s*(?:([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?([a-z_]+)\s*$")


def parse_score(spec: Any) -> Score:
    """A score as sorted ``((name, weight), ...)``: from a name (``"v_norm"``), a weighted sum
    (``"v_norm + 0.25*staleness"``, ``"0.5*attention+0.5*random"``), a mapping name → weight,
    or pairs. Weights may be negative (``"-1*v_norm"`` flips the direction).

    >>> parse_score("0.5*random + v_norm")
    (('random', 0.5), ('v_norm', 1.0))
    """
    if isinstance(spec, str):
        pairs = []
        for term in spec.replace("-", "+-").replace("e+-", "e-").replace("E+-", "E-").split("+"):
            if not term.strip():
                continue
            m = _TERM.match(term)
            if m is None:
                raise ScheduleError(f"cannot read score term {term.strip()!r} in {spec!r}; write e.g. 'v_norm+0.25*staleness'")
            sign = -1.0 if m.group(1) == "-" else 1.0
            try:
                weight = float(m.group(2)) if m.group(2) else 1.0
            except ValueError:
                raise ScheduleError(f"cannot read the weight of {term.strip()!r} in {spec!r}") from None
            pairs.append((m.group(3), sign * weight))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in spec):
        pairs = [tuple(p) for p in spec]
    else:
        raise ScheduleError(f"a score is a name, a weighted sum like 'v_norm+0.25*staleness' or a mapping name → weight, got {spec!r:.80}")
    out: dict[str, float] = {}
    for name, weight in pairs:
        if name not in SCORE_NAMES:
            raise ScheduleError(f"unknown token score {name!r}; known scores: {', '.join(SCORE_NAMES)}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ScheduleError(f"the weight of score {name!r} must be a finite number, got {weight!r}")
        out[name] = out.get(name, 0.0) + float(weight)
    out = {k: v for k, v in out.items() if v != 0.0}
    if not out:
        raise ScheduleError(f"score {spec!r} has no term with a non-zero weight")
    return tuple(sorted(out.items()))


def _freeze_ratio(fresh_ratio: Any) -> float | list:
    """Validate a ratio, a per-block list or a per-step × per-block table (JSON-able lists)."""
    if isinstance(fresh_ratio, numbers.Real) and not isinstance(fresh_ratio, bool):
        return check_ratio(fresh_ratio)
    if hasattr(fresh_ratio, "tolist"):
        fresh_ratio = fresh_ratio.tolist()
    if not isinstance(fresh_ratio, (list, tuple)) or not fresh_ratio:
        raise ScheduleError(f"fresh_ratio must be a number, a per-block list or a [step][block] table, got {fresh_ratio!r}")
    if all(isinstance(r, (list, tuple)) for r in fresh_ratio):
        width = {len(r) for r in fresh_ratio}
        if len(width) != 1:
            raise ScheduleError("a fresh_ratio table must have the same number of blocks in every step")
        return [[check_ratio(v, f"fresh_ratio[{s}][{b}]") for b, v in enumerate(r)] for s, r in enumerate(fresh_ratio)]
    return [check_ratio(v, f"fresh_ratio[{b}]") for b, v in enumerate(fresh_ratio)]


def _ratio(s: Schedule, step: int, block: int, layout: Layout) -> float:
    r = s.params["fresh_ratio"]
    if isinstance(r, (int, float)):
        return float(r)
    if isinstance(r[0], (list, tuple)):
        if len(r) != s.num_steps or len(r[0]) != layout.num_blocks:
            raise ScheduleError(
                f"the fresh_ratio table is {len(r)} steps × {len(r[0])} blocks but the schedule has "
                f"{s.num_steps} steps and the model {layout.num_blocks} blocks; build it with that shape"
            )
        return float(r[step][block])
    if len(r) != layout.num_blocks:
        raise ScheduleError(f"fresh_ratio has {len(r)} per-block values but the model has {layout.num_blocks} blocks")
    return float(r[block])


def toca_profile(fresh_ratio: float, num_steps: int, num_blocks: int, *, step_weight: float = 0.4, layer_weight: float = 0.8) -> list[list[float]]:
    """ToCa's fresh-ratio profile as a [step][block] table: more tokens in early blocks and
    early (noisy) steps, ``ratio × (1 + w_s − 2 w_s t/T) × (1 + w_l − 2 w_l l/(L−1))`` with
    t = T−1−step (ToCa counts steps down) and l the block index, clipped to [0, 1].

    >>> toca_profile(0.5, 2, 2)
    [[0.9, 0.1], [1.0, 0.14]]
    """
    check_ratio(fresh_ratio)
    table = []
    for step in range(num_steps):
        t = num_steps - 1 - step
        sf = 1 + step_weight - 2 * step_weight * t / num_steps
        row = []
        for b in range(num_blocks):
            lf = 1 + layer_weight - 2 * layer_weight * b / max(num_blocks - 1, 1)
            row.append(round(min(1.0, max(0.0, fresh_ratio * sf * lf)), 6))
        table.append(row)
    return table


def _dual_check(s: Schedule) -> dict[str, Any]:
    """ToCa's and DuCa's parameters (see :meth:`Schedule.toca`, :meth:`Schedule.duca`)."""
    extra = {"aggressive_reuse": "output"} if s.method == "duca" else {}
    params = check_params(s, interval=..., fresh_ratio=..., score="v_norm", seed=0, **extra)
    params["interval"] = check_int("interval", params["interval"])
    params["fresh_ratio"] = _freeze_ratio(params["fresh_ratio"])
    table = params["fresh_ratio"]
    if isinstance(table, list) and table and isinstance(table[0], list):
        if s.num_steps is None:
            raise ScheduleError("a [step][block] fresh_ratio table fixes the number of steps: give num_steps")
        if len(table) != s.num_steps:
            raise ScheduleError(
                f"the fresh_ratio table has {len(table)} rows but the schedule has {s.num_steps} steps; "
                f"give one row of per-block ratios per step"
            )
    params["score"] = dict(parse_score(params["score"]))
    params["seed"] = check_int("seed", params["seed"], minimum=0)
    if s.method == "duca" and params["aggressive_reuse"] not in AGGRESSIVE_MODES:
        raise ScheduleError(f"aggressive_reuse must be one of {AGGRESSIVE_MODES}, got {params['aggressive_reuse']!r}")
    return params


# --------------------------------------------------------------------------- rules


def _conservative(s: Schedule, layout: Layout, step: int) -> dict[str, Action]:
    """A ToCa step: every branch reused except the MLPs, which are partially recomputed."""
    score = parse_score(s.params["score"])
    acts: dict[str, Action] = {}
    for b, kinds in enumerate(layout.branches):
        for kind in kinds:
            region = f"blocks.{b}.{kind}"
            if kind != "mlp":
                acts[region] = REUSE
                continue
            ratio = _ratio(s, step, b, layout)
            # ratio 0 is plain reuse: no scores, no state to record.
            acts[region] = Partial(ratio=ratio, score=score, seed=s.params["seed"]) if ratio > 0 else REUSE
    if not any("mlp" in kinds for kinds in layout.branches):
        raise ScheduleError("ToCa/DuCa recompute the MLP branch partially, but the model's blocks have no 'mlp' branch")
    return acts


def _toca_rule(s: Schedule, layout: Layout) -> list[dict[str, Action]]:
    n = s.params["interval"]
    return [{} if step % n == 0 else _conservative(s, layout, step) for step in range(s.num_steps)]


def _duca_rule(s: Schedule, layout: Layout) -> list[dict[str, Action]]:
    n = s.params["interval"]
    aggressive = ReuseResidual() if s.params["aggressive_reuse"] == "residual" else REUSE
    rules: list[dict[str, Action]] = []
    for step in range(s.num_steps):
        r = step % n
        if r == 0:
            rules.append({})
        elif r % 2 == 1:
            rules.append(_conservative(s, layout, step))
        else:
            rules.append({"stack": aggressive})
    return rules


def _toca_label(s: Schedule, step: int) -> str:
    return "full" if step % s.params["interval"] == 0 else "conservative"


def _duca_label(s: Schedule, step: int) -> str:
    r = step % s.params["interval"]
    return "full" if r == 0 else ("conservative" if r % 2 == 1 else "aggressive")


def _ratio_blocks(s: Schedule) -> int | None:
    """The number of blocks a per-block ratio (list or [step][block] table) is written for."""
    r = s.params["fresh_ratio"]
    if isinstance(r, (int, float)):
        return None
    return len(r[0]) if isinstance(r[0], (list, tuple)) else len(r)


register_method(Method("toca", _toca_rule, _dual_check, _toca_label, _ratio_blocks))
register_method(Method("duca", _duca_rule, _dual_check, _duca_label, _ratio_blocks))


# --------------------------------------------------------------------------- state


def _block_of(region: str) -> str:
    parts = region.split(".")
    if len(parts) < 3 or parts[0] != "blocks":
        raise ScheduleError(f"partial recompute applies to a branch region (blocks.<i>.mlp), not {region!r}")
    return ".".join(parts[:2])


def _runs_fully(region: str, acts: Mapping[str, Action]) -> bool:
    """The region runs on all tokens at this step (it and every enclosing region compute)."""
    if acts.get(region, COMPUTE).kind != "compute":
        return False
    if region == "stack":
        return True
    if not acts.get("stack", COMPUTE).computes:
        return False
    block = ".".join(region.split(".")[:2])
    return region == block or acts.get(block, COMPUTE).computes


def _needed_state(rules: list[dict[str, Action]], layout: Layout) -> dict[str, set[str]]:
    known = set(layout.region_names())
    needs: dict[str, set[str]] = {}
    for acts in rules:
        for region, a in acts.items():
            if a.kind == "residual":
                needs.setdefault(region, set()).add("residual")
            if a.kind != "partial":
                continue
            for name, _ in a.score:
                if name in _ATTENTION_STATE:
                    attn = _block_of(region) + ".attn"
                    if attn not in known:
                        raise ScheduleError(
                            f"score {name!r} for {region} needs the attention branch {attn}, which the model "
                            f"does not have; use score='random' or 'staleness'"
                        )
                    needs.setdefault(attn, set()).add(name)
                elif name == "staleness":
                    needs.setdefault(region, set()).add("staleness")
    return needs


def attach_state(rules: list[dict[str, Action]], schedule: Schedule, layout: Layout) -> list[dict[str, Action]]:
    """Turn every full compute of a region whose state a later action needs into a
    :class:`Record` of that state, and refuse a read of state that no earlier step recorded.

    Registered as a rule transform, so it runs inside :meth:`Schedule.resolve` for every method.
    """
    needs = _needed_state(rules, layout)
    if not needs:
        return rules
    recorded: set[tuple[str, str]] = set()
    out = []
    for step, acts in enumerate(rules):
        acts = dict(acts)
        for region, a in list(acts.items()):
            # staleness counts steps since a token was last recomputed, by any partial step
            if a.kind == "partial" and "staleness" in needs.get(region, ()) and not a.stamps:
                acts[region] = dataclasses.replace(a, restamp=True)
        for region, states in sorted(needs.items()):
            if _runs_fully(region, acts):
                prior = getattr(acts.get(region), "state", ())
                acts[region] = Record(state=tuple(sorted(set(prior) | states)))
                recorded |= {(region, st) for st in states}
        for region, a in acts.items():
            if a.kind != "partial":
                continue
            for name, _ in a.score:
                src = _block_of(region) + ".attn" if name in _ATTENTION_STATE else region
                if name != "random" and (src, name) not in recorded:
                    raise ScheduleError(
                        f"step {step} recomputes tokens of {region} by score {name!r}, but no earlier step "
                        f"computed {src} fully; start the schedule with a full step"
                    )
        out.append(acts)
    return out


register_rule_transform(attach_state)
