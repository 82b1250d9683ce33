"""ToCa and DuCa in one place: the schedule method and its actions (:mod:`.schedule`), the token
scores (:mod:`.scores`), the partial recompute (:mod:`.partial`) and the stack's residual reuse
(:mod:`.stack`) as graph passes, and the per-step step-index input (:func:`step_values`)."""

from cachecompile.methods.dual.partial import partial_tokens, sink_token_scatters
from cachecompile.methods.dual.schedule import (
    AGGRESSIVE_MODES,
    SCORE_NAMES,
    STEP_INPUT,
    Partial,
    Record,
    ReuseResidual,
    attach_state,
    check_ratio,
    parse_score,
    step_values,
    toca_profile,
    tokens_to_recompute,
)
from cachecompile.methods.dual.scores import record_token_state
from cachecompile.methods.dual.stack import stack_reuse

__all__ = [
    "AGGRESSIVE_MODES", "SCORE_NAMES", "STEP_INPUT", "Partial", "Record", "ReuseResidual", "attach_state", "check_ratio",
    "parse_score", "partial_tokens", "record_token_state", "sink_token_scatters", "stack_reuse", "step_values",
    "toca_profile", "tokens_to_recompute",
]
