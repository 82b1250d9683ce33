import json

import pytest
import torch

import cachecompile as cc
from cachecompile.core.schedule import COMPUTE, REUSE, Layout, Schedule, ScheduleError

LAYOUT = Layout(branches=(("attn", "mlp"),) * 3)


def test_fora_plans_follow_the_interval():
    plans = cc.Schedule.fora(num_steps=7, interval=3).resolve(LAYOUT)
    assert [p.is_full for p in plans] == [True, False, False, True, False, False, True]
    cached = plans[1]
    assert {r for r, a in cached.actions} == set(LAYOUT.branch_regions())
    assert all(a == REUSE for _, a in cached.actions)
    assert plans[0].writes == frozenset(LAYOUT.branch_regions())
    assert plans[1].writes == frozenset()
    assert len(set(plans)) == 2


def test_interval_one_computes_everything():
    plans = cc.Schedule.fora(5, 1).resolve(LAYOUT)
    assert all(p.is_full and not p.writes for p in plans)


def test_mask_resolves_per_block_and_branch():
    mask = [[[1, 1], [1, 1], [1, 1]], [[0, 1], [1, 0], [0, 0]]]
    plans = cc.Schedule.from_mask(mask).resolve(LAYOUT)
    assert plans[0].is_full
    assert dict(plans[1].actions) == {
        "blocks.0.attn": REUSE,
        "blocks.1.mlp": REUSE,
        "blocks.2.attn": REUSE,
        "blocks.2.mlp": REUSE,
    }
    assert plans[1].action("blocks.0.mlp") == COMPUTE
    assert plans[0].writes == {"blocks.0.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.2.mlp"}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: cc.Schedule.fora(10, 0), "interval"),
        (lambda: cc.Schedule.fora(0, 2), "num_steps"),
        (lambda: cc.Schedule.fora(10, 1.5), "interval"),
        (lambda: cc.Schedule.from_mask([[[1, 1], [1]]]), "wrong shape"),
        (lambda: cc.Schedule.from_mask([]), "empty"),
        (lambda: cc.Schedule.from_mask([[[1, 1]], [[1, 1], [0, 0]]]), "wrong shape"),
    ],
)
def test_invalid_schedules_fail_clearly(make, match):
    with pytest.raises(ScheduleError, match=match):
        make()


def test_mask_with_wrong_block_count_names_the_fix():
    with pytest.raises(ScheduleError, match=r"mask has 2 blocks.*model has 3"):
        cc.Schedule.from_mask([[[1, 1]] * 2]).resolve(LAYOUT)


def test_unknown_region_is_named():
    s = cc.Schedule.explicit([{}, {"blocks.9.attn": "reuse"}])
    with pytest.raises(ScheduleError, match=r"blocks\.9\.attn.*does not have"):
        s.resolve(LAYOUT)


def test_reuse_before_compute_is_refused():
    with pytest.raises(ScheduleError, match="before any step computed it"):
        cc.Schedule.from_mask([[[0, 1]] * 3, [[1, 1]] * 3]).resolve(LAYOUT)
    with pytest.raises(ScheduleError, match="before any step computed it"):
        cc.Schedule.explicit([{"stack": "reuse"}]).resolve(LAYOUT)


def test_explicit_stack_reuse_shadows_inner_regions():
    s = cc.Schedule.explicit([{}, {"stack": "reuse", "blocks.1.mlp": "reuse"}])
    plans = s.resolve(LAYOUT)
    assert dict(plans[1].actions) == {"stack": REUSE}
    assert plans[0].writes == {"stack"}


@pytest.mark.parametrize(
    "schedule",
    [
        cc.Schedule.fora(12, 3),
        cc.Schedule.from_mask([[[1, 1], [1, 1]], [[0, 1], [1, 0]]]),
        cc.Schedule.explicit([{}, {"blocks.0.attn": "reuse", "stack": "compute"}]),
    ],
)
def test_save_load_round_trip(tmp_path, schedule):
    path = tmp_path / "s.json"
    schedule.save(path)
    loaded = cc.Schedule.load(path)
    assert loaded == schedule
    assert hash(loaded) == hash(schedule)
    assert json.loads(path.read_text())["format"] == "cachecompile.core.schedule/1"
    assert loaded.resolve(Layout(branches=(("attn", "mlp"),) * 2)) == schedule.resolve(
        Layout(branches=(("attn", "mlp"),) * 2)
    )


def test_load_refuses_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"hello": 1}')
    with pytest.raises(ScheduleError, match="not a cachecompile schedule"):
        cc.Schedule.load(p)


def test_mask_loads_from_files(tmp_path):
    import numpy as np

    mask = np.ones((2, 3, 2), dtype=np.int64)
    mask[1, 0, 0] = 0
    np.save(tmp_path / "m.npy", mask)
    (tmp_path / "m.json").write_text(json.dumps(mask.tolist()))
    a = cc.Schedule.from_mask(tmp_path / "m.npy")
    b = cc.Schedule.from_mask(str(tmp_path / "m.json"))
    assert a == b
    assert dict(a.resolve(LAYOUT)[1].actions) == {"blocks.0.attn": REUSE}


def test_print_shows_step_by_block_table():
    text = str(cc.Schedule.from_mask([[[1, 1], [1, 1]], [[0, 1], [1, 0]]]))
    lines = text.splitlines()
    assert lines[0].startswith("Schedule.mask")
    assert lines[2].split()[-2:] == ["AM", "AM"]
    assert lines[3].split()[-2:] == ["·M", "A·"]
    fora = str(cc.Schedule.fora(4, 2)).splitlines()
    assert [line.split()[1] for line in fora[2:]] == ["full", "cached", "full", "cached"]
    assert fora[3].split()[-1] == "··"


def test_schedule_is_immutable():
    s = cc.Schedule.fora(4, 2)
    with pytest.raises(TypeError):
        s.params["interval"] = 3


# --------------------------------------------------------------------------- cache_dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, "float16", "torch.bfloat16"])
def test_cache_dtype_round_trips_and_shows(tmp_path, dtype):
    s = Schedule.fora(interval=3, cache_dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    assert s.cache_dtype == name
    path = tmp_path / "s.json"
    s.save(path)
    assert json.loads(path.read_text())["cache_dtype"] == name
    back = Schedule.load(path)
    assert back == s and hash(back) == hash(s) and back.cache_dtype == name
    assert back.bind(6).cache_dtype == name
    assert f"cache_dtype=torch.{name}" in str(s) and f"cache_dtype=torch.{name}" in repr(s)
    assert s != Schedule.fora(interval=3)  # storage is part of the schedule
    assert Schedule.fora(interval=3).with_cache_dtype(dtype) == s
    assert "cache_dtype" not in Schedule.fora(interval=3).to_dict()  # files without it read as before


@pytest.mark.parametrize("preset", [
    lambda d: Schedule.toca(4, 2, 0.5, cache_dtype=d), lambda d: Schedule.duca(4, 2, 0.5, cache_dtype=d),
    lambda d: Schedule.from_mask([[[1, 1]], [[0, 0]]], cache_dtype=d), lambda d: Schedule.explicit([{}, {"stack": "reuse"}], cache_dtype=d),
    lambda d: Schedule.dbcache(0.1, num_steps=4, cache_dtype=d), lambda d: Schedule.teacache(0.1, [1.0, 0.0], num_steps=4, cache_dtype=d),
])
def test_every_preset_takes_a_cache_dtype(preset):
    s = preset(torch.bfloat16)
    assert s.cache_dtype == "bfloat16" and Schedule.loads(s.dumps()) == s


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "float8_e4m3fnuz", "half", 16])
def test_unsupported_cache_dtype_is_a_schedule_error(bad):
    with pytest.raises(ScheduleError, match="cache_dtype must be one of"):
        Schedule.fora(interval=3, cache_dtype=bad)
    d = Schedule.fora(interval=3).to_dict()
    d["cache_dtype"] = str(bad)
    with pytest.raises(ScheduleError, match="cache_dtype"):
        Schedule.from_dict(d)
