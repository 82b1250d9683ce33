"""Compensation in one place: GOC, EOC and Taylor as schedule data and rules (:mod:`.schedule`),
their graph pass (:mod:`.graph`), their per-step values (:func:`step_values`) and what their
state costs in cache memory (:func:`memory_report`). Calibration of GOC and EOC (which runs the
model) is :func:`cachecompile.calibrate`."""

from cachecompile.methods.compensation.graph import compensate
from cachecompile.methods.compensation.schedule import (
    EOC,
    GOC,
    Forecast,
    History,
    MemoryReport,
    PriorTable,
    Taylor,
    check_used_queue_stable,
    compensable_regions,
    history_of,
    history_slots,
    history_token,
    is_history_slot,
    memory_report,
    state_slots,
    step_values,
    taylor_coefficients,
)

__all__ = [
    "EOC", "GOC", "Forecast", "History", "MemoryReport", "PriorTable", "Taylor", "check_used_queue_stable", "compensable_regions", "compensate",
    "history_of", "history_slots", "history_token", "is_history_slot", "memory_report", "state_slots", "step_values",
    "taylor_coefficients",
]
