"""Schedules from files and presets fail with a ScheduleError that names the fix (issue 14, items 6,
7, 9, 10): every case here was accepted silently, or failed with another error, before the
schedule core checked files like presets."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch

import cachecompile as cc
from cachecompile.core.schedule import REUSE, Layout, ScheduleError, action_from_json
from cachecompile.methods.dual import Partial

LAYOUT = Layout(branches=(("attn", "mlp"),) * 2)


def saved(schedule: cc.Schedule) -> dict:
    return json.loads(schedule.dumps())


def load_text(tmp_path, text: str, name: str = "s.json") -> cc.Schedule:
    path = tmp_path / name
    path.write_text(text)
    return cc.Schedule.load(path)


# --------------------------------------------------------------------------- item 6: files are checked like presets


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["params"].update(fresh_ratio=float("nan")), r"fresh_ratio must be a number in \[0, 1\], got nan"),
        (lambda d: d["params"].update(interval=-2), r"interval must be an integer >= 1, got -2"),
        (lambda d: d["params"].update(interval=0), r"interval must be an integer >= 1, got 0"),
        (lambda d: d["params"].update(interval=2.5), r"interval must be an integer >= 1, got 2.5"),
        (lambda d: d["params"].update(fresh_ratio=1.5), r"fresh_ratio must be in \[0, 1\]"),
        (lambda d: d["params"].update(score="vnorm"), r"unknown token score 'vnorm'"),
        (lambda d: d["params"].update(intreval=3), r"has no parameter\(s\) \['intreval'\]"),
        (lambda d: d["params"].pop("interval"), r"needs parameter 'interval'"),
        (lambda d: d.update(compensaton={"kind": "goc"}), r"unknown schedule field\(s\) \['compensaton'\]"),
        (lambda d: d.update(extra=1), r"unknown schedule field\(s\) \['extra'\]"),
    ],
)
def test_a_bad_toca_file_is_refused_naming_the_field(tmp_path, edit, match):
    d = saved(cc.Schedule.toca(6, 3, 0.3))
    edit(d)
    with pytest.raises(ScheduleError, match=match) as info:
        load_text(tmp_path, json.dumps(d))
    assert "s.json" in str(info.value)  # the error names the file


def test_nan_written_by_hand_is_refused(tmp_path):
    text = cc.Schedule.toca(6, 3, 0.3).dumps().replace('"fresh_ratio": 0.3', '"fresh_ratio": NaN')
    assert "NaN" in text
    with pytest.raises(ScheduleError, match="fresh_ratio must be a number"):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    "compensation, match",
    [
        ({"kind": "goc", "wieght": 1}, r"GOC compensation has unknown key\(s\) \['wieght'\]"),
        ({"kind": "goc", "weight": 1, "skip_step": [3]}, r"unknown key\(s\) \['skip_step'\]"),
        ({"kind": "taylor", "ordr": 2}, r"Taylor compensation has unknown key\(s\) \['ordr'\]"),
        ({"kind": "taylor", "order": 2.5}, r"order must be 1 or 2, got 2.5"),
        ({"kind": "taylor", "order": "2"}, r"order must be 1 or 2, got '2'"),
        ({"kind": "taylor", "order": True}, r"order must be 1 or 2, got True"),
        ({"kind": "eoc", "thetaa": 0.01}, r"EOC compensation has unknown key\(s\) \['thetaa'\]"),
        ({"kind": "eoc", "threshold": "high"}, r"threshold must be a finite number"),
        ({"kind": "eoc", "prior": [1, 2]}, r"EOC prior must map"),
        ({"kind": "eoc", "judged": [3]}, r"EOC judged must map region names"),
        ({"kind": "eoc", "prior": {"blocks.0.attn": {"shape": [6, 4], "data": "AAAA"}}}, r"needs 96 bytes.*has 3"),
        ({"kind": "eoc", "prior": {"blocks.0.attn": {"shape": [6, 4], "data": "not base64!"}}}, r"not base64"),
        ({"kind": "eoc", "prior": {"blocks.0.attn": {"shape": [6, 4]}}}, r"prior table lacks \['data'\]"),
        ({"kind": "eoc", "prior": {"blocks.0.attn": None}}, r"cannot read compensation"),  # found by the long fuzz run
        ({"kind": "goc", "skip_steps": 5}, r"skip_steps must be a list"),
        ({"kind": "goc", "steps": 5}, r"GOC steps must be a list"),
        ({"kind": "goc", "skip_steps": ["x"]}, r"skip_steps must hold step indices"),
        ({"kind": "goc", "queue": ["used"]}, r"queue must be 'used'"),
        ({"kind": "gox"}, r"unknown compensation"),
        ("goc", r"unknown compensation"),
    ],
)
def test_a_bad_compensation_in_a_file_is_refused(tmp_path, compensation, match):
    d = saved(cc.Schedule.fora(6, 3, compensation=cc.GOC()))
    d["compensation"] = compensation
    with pytest.raises(ScheduleError, match=match):
        load_text(tmp_path, json.dumps(d))


def test_interval_zero_is_refused_before_any_call():
    d = saved(cc.Schedule.fora(6, 3))
    d["params"]["interval"] = 0
    with pytest.raises(ScheduleError, match="interval must be an integer >= 1"):
        cc.Schedule.from_dict(d)


# --------------------------------------------------------------------------- item 7: masks hold 0 or 1, in 3 dimensions


@pytest.mark.parametrize("entry", [2, -1, 0.5, "0", "1", None, np.float32(0.5), float("nan")])
def test_mask_entries_other_than_0_or_1_are_refused(entry):
    with pytest.raises(ScheduleError, match=r"mask entry \[1\]\[0\]\[0\] is .*holds 0 \(reuse\) or 1 \(compute\)"):
        cc.Schedule.from_mask([[[1, 1]], [[entry, 1]]])


@pytest.mark.parametrize("entry, computes", [(0, False), (1, True), (True, True), (False, False), (np.int64(0), False), (1.0, True)])
def test_mask_entries_of_any_numeric_type_read_as_flags(entry, computes):
    plans = cc.Schedule.from_mask([[[1, 1], [1, 1]], [[entry, 1], [1, 1]]]).resolve(LAYOUT)
    assert (plans[1].action("blocks.0.attn") == REUSE) is not computes


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.ones((2, 1, 2, 2)), r"more than 3 dimensions"),
        (torch.ones(2, 1, 2, 2), r"more than 3 dimensions"),
        ([[1, 1], [0, 1]], r"must have 3 dimensions"),
        (np.ones((2, 2)), r"must have 3 dimensions"),
        ([1, 0], r"must have 3 dimensions"),
        ([[[1, 1]], [[1]]], r"ragged or of the wrong shape"),
        ([], r"non-empty"),
        (7, r"non-empty nested lists"),
    ],
)
def test_masks_of_the_wrong_shape_are_refused(mask, match):
    with pytest.raises(ScheduleError, match=match):
        cc.Schedule.from_mask(mask)


def test_a_mask_file_with_a_bad_entry_is_refused(tmp_path):
    d = saved(cc.Schedule.from_mask([[[1, 1]], [[0, 1]]]))
    d["mask"][1][0][0] = "0"
    with pytest.raises(ScheduleError, match=r"mask entry \[1\]\[0\]\[0\] is '0'"):
        load_text(tmp_path, json.dumps(d))


# --------------------------------------------------------------------------- item 9: copies


EOC_PRIOR = {"blocks.0.attn": torch.linspace(-1, 1, 6 * 8).reshape(6, 8), "blocks.1.mlp": torch.ones(6, 8)}


@pytest.mark.parametrize(
    "schedule",
    [
        cc.Schedule.fora(6, 3),
        cc.Schedule.toca(6, 3, [0.2, 0.4], "v_norm+0.25*staleness"),
        cc.Schedule.duca(6, 3, 0.3, aggressive_reuse="residual"),
        cc.Schedule.from_mask([[[1, 1], [1, 1]], [[0, 1], [1, 0]]]),
        cc.Schedule.explicit([{}, {"blocks.0.mlp": Partial(ratio=0.5, score=(("random", 1.0),))}]),
        cc.Schedule.fora(6, 3, compensation=cc.GOC(0.8, skip_steps={"blocks.0.attn": (4,)}, steps=(1, 2, 4))),
        cc.Schedule.fora(6, 2, compensation=cc.Taylor(order=2)),
        cc.Schedule.fora(6, 3, compensation=cc.EOC(theta=0.02, prior=EOC_PRIOR, threshold=0.1, judged={"blocks.0.attn": (1, 2)})),
    ],
    ids=["fora", "toca", "duca", "mask", "explicit", "goc", "taylor", "eoc"],
)
def test_schedules_deepcopy_and_pickle(schedule):
    for copied in (copy.deepcopy(schedule), pickle.loads(pickle.dumps(schedule)), copy.copy(schedule)):
        assert copied == schedule and hash(copied) == hash(schedule)
        assert copied.dumps() == schedule.dumps()
        assert copied.resolve(LAYOUT) == schedule.resolve(LAYOUT)
    if isinstance(schedule.compensation, cc.EOC):
        copied = pickle.loads(pickle.dumps(schedule))
        for slot, table in EOC_PRIOR.items():
            assert torch.equal(copied.compensation.prior_tensor(slot), table)


def test_torch_save_of_a_schedule_round_trips(tmp_path):
    s = cc.Schedule.fora(6, 3, compensation=cc.EOC(theta=0.02, prior=EOC_PRIOR))
    torch.save(s, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=False) == s


# --------------------------------------------------------------------------- item 10: clear, early errors


def test_a_truncated_file_names_the_file(tmp_path):
    text = cc.Schedule.fora(6, 3).dumps()
    with pytest.raises(ScheduleError, match=r"cut\.json: not a schedule: invalid JSON"):
        load_text(tmp_path, text[: len(text) // 2], "cut.json")


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "cachecompile.core.schedule/1", "method": "fora", "params": {"interval": 2}}', r"lacks \['num_steps'\]"),
        ('{"format": "cachecompile.core.schedule/1", "num_steps": 4, "params": {"interval": 2}}', r"lacks \['method'\]"),
        ("[1, 2, 3]", r"holds a JSON object, got list"),
        ('"fora"', r"holds a JSON object, got str"),
        ("", r"invalid JSON"),
        ('{"format": "cachecompile.core.schedule/1", "num_steps": "4", "method": "fora", "params": {"interval": 2}}', r"num_steps must be an integer"),
        ('{"format": "cachecompile.core.schedule/1", "num_steps": 4, "method": "foro", "params": {"interval": 2}}', r"unknown schedule method 'foro'"),
        ('{"format": "cachecompile.core.schedule/1", "num_steps": 4, "method": "fora", "params": [2]}', r"params must be a mapping"),
    ],
)
def test_malformed_files_are_schedule_errors(tmp_path, text, match):
    with pytest.raises(ScheduleError, match=match):
        load_text(tmp_path, text)


def test_a_file_that_is_not_text_is_a_schedule_error(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ScheduleError, match="bin.json"):
        cc.Schedule.load(tmp_path / "bin.json")


@pytest.mark.parametrize(
    "step, match",
    [
        (["blocks.0.attn"], r"step 1 of an explicit schedule must map region names to actions"),
        ({"blocks.0.attn": "skip"}, r"unknown action 'skip'"),
        ({"blocks.0.attn": ["reuse"]}, r"unknown action \['reuse'\]"),
        ({"blocks.0.attn": {"kind": "reuse", "x": 1}}, r"reuse action has unknown key\(s\) \['x'\]"),
        ({"blocks.0.attn": {"kind": "residual"}}, r"residual reuse applies to the whole block stack"),
    ],
)
def test_bad_explicit_steps_are_refused(tmp_path, step, match):
    d = saved(cc.Schedule.explicit([{}, {"blocks.0.attn": "reuse"}]))
    d["steps"][1] = step
    with pytest.raises(ScheduleError, match=match):
        load_text(tmp_path, json.dumps(d))
    with pytest.raises(ScheduleError, match=match):
        cc.Schedule.explicit([{}, step])


def test_residual_reuse_of_the_stack_is_allowed_in_explicit_schedules():
    s = cc.Schedule.explicit([{}, {"stack": {"kind": "residual"}}])
    assert cc.Schedule.loads(s.dumps()) == s
    assert s.resolve(LAYOUT)[1].action("stack").kind == "residual"


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"kind": "partial"}, r"partial action lacks \['ratio'\]"),
        ({"kind": "partial", "ratio": float("nan")}, r"must be a number in \[0, 1\]"),
        ({"kind": "partial", "ratio": 1.01}, r"must be in \[0, 1\]"),
        ({"kind": "partial", "ratio": "0.5"}, r"must be a number"),
        ({"kind": "partial", "ratio": 0.5, "sede": 1}, r"unknown key\(s\) \['sede'\]"),
        ({"kind": "partial", "ratio": 0.5, "seed": -1}, r"seed must be an integer >= 0"),
        ({"kind": "partial", "ratio": 0.5, "seed": 1.5}, r"seed must be an integer >= 0"),
        ({"kind": "partial", "ratio": 0.5, "score": 3}, r"a score is a name"),
        ({"kind": "partial", "ratio": 0.5, "score": {"v_norm": "x"}}, r"weight of score 'v_norm' must be a finite number"),
        ({"kind": "partial", "ratio": 0.5, "score": "v_norm-v_norm"}, r"no term with a non-zero weight"),
        ({"kind": "forecast"}, r"forecast action lacks \['method'\]"),
        ({"kind": "forecast", "method": "goc", "order": "x"}, r"order must be an integer"),
        ({"kind": "forecast", "method": "magic"}, r"method is one of"),
        ({"kind": "forecast", "method": "goc", "queue": "last"}, r"queue is 'used' or 'computed'"),
        ({"kind": "forecast", "method": "eoc", "prior_shapes": [[6, "a"]]}, r"prior shape's size must be an integer"),
        ({"kind": "history", "state": 5}, r"history action's state must be a list of names"),
        ({"kind": "record", "state": "v_norm"}, r"record action's state must be a list of names"),
        ({"kind": "residual", "from": "stack"}, r"unknown key\(s\) \['from'\]"),
        ({"kind": 3}, r"unknown action"),
        (None, r"unknown action"),
    ],
)
def test_bad_action_json_is_a_schedule_error(obj, match):
    with pytest.raises(ScheduleError, match=match):
        action_from_json(obj)


def test_numpy_numbers_are_accepted_where_python_ones_are():
    a = cc.Schedule.toca(np.int64(6), np.int64(3), np.float32(0.25), seed=np.int32(2))
    b = cc.Schedule.toca(6, 3, 0.25, seed=2)
    assert a == b and a.dumps() == b.dumps()
    assert cc.Schedule.fora(6, np.int64(3)) == cc.Schedule.fora(6, 3)
    assert cc.GOC(weight=np.float32(0.5)) == cc.GOC(weight=0.5)
    assert cc.Taylor(order=np.int64(2)) == cc.Taylor(order=2)
    assert cc.Schedule.toca(6, 3, np.array([0.25, 0.5])).params["fresh_ratio"] == [0.25, 0.5]
