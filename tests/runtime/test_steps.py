"""The step clock: calls → (step, call within step), and the checks that calls fit the schedule."""

import pytest
import torch

import cachecompile as cc
from cachecompile.runtime.steps import StepClock, StepMismatchError, check_calls_per_step, timestep_value
from tests.conftest import dit_inputs


def run(clock, timesteps, contexts=None):
    contexts = contexts or [None] * len(timesteps)
    return [clock.tick(t, c) for t, c in zip(timesteps, contexts)]


def test_counts_steps_and_finishes_generations():
    clock = StepClock(3, 2)
    got = run(clock, [900, 900, 600, 600, 300, 300])
    assert got == [(0, 0, False), (0, 1, False), (1, 0, False), (1, 1, False), (2, 0, False), (2, 1, True)]
    assert clock.next_step == 0 and clock.calls == 0
    run(clock, [900, 900])  # the next generation starts higher up: fine
    assert clock.next_step == 1


@pytest.mark.parametrize("contexts", [None, ["cond", "uncond"] * 3])
def test_auto_detects_calls_per_step(contexts):
    clock = StepClock(3, "auto")
    got = run(clock, [900, 900, 600, 600, 300, 300], contexts)
    assert [g[:2] for g in got] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] and got[-1][2]
    assert clock.detected == 2
    clock = StepClock(3, "auto")
    assert run(clock, [900, 600, 300])[-1] == (2, 0, True) and clock.detected == 1


def test_auto_detects_from_contexts_alone():
    clock = StepClock(2, "auto")
    got = run(clock, [None] * 4, ["cond", "uncond", "cond", "uncond"])
    assert got[-1] == (1, 1, True) and clock.detected == 2
    clock = StepClock(2, "auto")
    clock.tick(None)
    with pytest.raises(StepMismatchError, match="needs calls with a `timestep`"):
        clock.tick(None)


def test_too_many_declared_calls_per_step():
    clock = StepClock(3, 2)
    clock.tick(900)
    with pytest.raises(StepMismatchError, match=r"calls_per_step=2, but the timestep changed from 900 to 600 after 1 call"):
        clock.tick(600)
    assert clock.calls == 1, "a refused call changes nothing"


def test_too_few_declared_calls_per_step_under_contexts():
    clock = StepClock(3, 1)
    clock.tick(900, "cond")
    with pytest.raises(StepMismatchError, match=r"'cond'.*'uncond'.*calls_per_step=1"):
        clock.tick(900, "uncond")


def test_fewer_steps_than_the_schedule():
    clock = StepClock(4, 1)
    run(clock, [900, 600, 300])  # the pipeline runs 3 steps
    with pytest.raises(StepMismatchError, match=r"went up from 300 to 900 after 3 of the generation's 4 steps"):
        clock.tick(900)
    with pytest.raises(StepMismatchError):  # and keeps failing until the user fixes it ...
        clock.tick(900)
    clock.reset()  # ... or resets on purpose
    assert clock.tick(900) == (0, 0, False)


@pytest.mark.parametrize("calls_per_step, timesteps", [(1, [900, 600, 300, 200, 100]), (1, [900, 900, 600, 600, 300]), (2, [900, 900, 600, 600, 300])])
def test_more_steps_or_calls_than_the_schedule(calls_per_step, timesteps):
    """The second case is guidance as two calls with calls_per_step=1 and an odd number of calls:
    the call after the schedule's end repeats the last timestep."""
    clock = StepClock(len(timesteps) - 1 if calls_per_step == 1 else 2, calls_per_step)
    n = clock.num_steps * calls_per_step
    run(clock, timesteps[:n])
    with pytest.raises(StepMismatchError, match="runs more steps than the generation has"):
        clock.tick(timesteps[n])


def test_constant_timesteps_and_duplicates_are_not_errors():
    clock = StepClock(2, 1)
    run(clock, [500] * 7)  # hand-made calls with one timestep: counting only
    clock = StepClock(5, 1)  # a second-order scheduler repeats timesteps
    assert run(clock, [999, 700, 700, 400, 400])[-1] == (4, 0, True)
    run(clock, [999])


def test_begin_generation_checks_the_step_count():
    clock = StepClock(4, 1)
    run(clock, [900, 600])
    with pytest.raises(StepMismatchError, match=r"runs 5 denoising steps but the schedule has 4.*interval=.*num_inference_steps=4"):
        clock.begin_generation(5)
    clock.begin_generation(4)
    assert clock.tick(900) == (0, 0, False)


def test_argument_checks():
    assert check_calls_per_step("auto") == "auto" and check_calls_per_step(2) == 2
    for bad in (0, -1, 1.5, True, "two"):
        with pytest.raises(ValueError, match="calls_per_step"):
            check_calls_per_step(bad)
    with pytest.raises(ValueError, match="at least 2 steps"):
        StepClock(1, "auto")
    assert timestep_value(torch.tensor([3.5, 1.0])) == 3.5 and timestep_value(7) == 7.0 and timestep_value(None) is None


def test_cached_transformer_detects_two_calls_per_step(dit):
    """CFG as two hand-made calls per step without cache contexts: 'auto' equals declared 2."""
    kw_c, kw_u = dit_inputs(seed=1), dit_inputs(seed=2)
    schedule = cc.Schedule.fora(3, 2)
    auto, two = cc.optimize(dit, schedule, calls_per_step="auto"), cc.optimize(dit, schedule, calls_per_step=2)
    for t in (900, 600, 300):
        for kw in (kw_c, kw_u):
            kw = {**kw, "timestep": torch.full((2,), t)}
            torch.testing.assert_close(auto(**kw).sample, two(**kw).sample, rtol=0, atol=0)
    assert auto.calls_per_step == 2 and auto.step == 0
    with pytest.raises(cc.StepMismatchError, match="runs more steps"):
        auto(**{**kw_c, "timestep": torch.full((2,), 100)})
    assert auto.step == 0, "a refused call does not advance the schedule"


def test_timestep_found_by_position(dit):
    kw = dit_inputs()
    cached = cc.optimize(dit, cc.Schedule.fora(2, 1))
    cached(kw["hidden_states"], torch.full((2,), 100), kw["class_labels"])
    with pytest.raises(cc.StepMismatchError, match="went up from 100 to 900"):
        cached(kw["hidden_states"], torch.full((2,), 900), kw["class_labels"])


def test_open_ended_generations_end_where_the_next_begins():
    """A schedule without a step count: the generation runs until the timestep rises again."""
    clock = StepClock(num_steps=None)
    positions = [clock.tick(t)[:2] for t in (999.0, 700.0, 400.0, 100.0, 999.0, 500.0)]
    assert positions == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 0), (1, 0)]
    cfg_as_two_calls = StepClock(num_steps=None, calls_per_step="auto")
    assert [cfg_as_two_calls.tick(t)[:2] for t in (999.0, 999.0, 1.0, 1.0, 999.0, 999.0)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1)
    ]


def test_an_announced_length_is_checked_like_a_fixed_one():
    clock = StepClock(num_steps=None)
    clock.begin_generation(3)
    assert [clock.tick(t) for t in (999.0, 500.0, 1.0)] == [(0, 0, False), (1, 0, False), (2, 0, True)]
    clock.begin_generation(2)
    clock.tick(999.0)
    with pytest.raises(StepMismatchError, match="went up from 999 to 1000 after 1 of the generation's 2 steps"):
        clock.locate(1000.0)
    fixed = StepClock(num_steps=4)
    with pytest.raises(StepMismatchError, match="runs 3 denoising steps but the schedule has 4"):
        fixed.begin_generation(3)


def test_an_abandoned_generation_restarting_lower_is_caught_at_its_first_call():
    """Generation 1 runs its 6 steps; generation 2 is abandoned after 3; generation 3 starts at a
    lower timestep than step 3 of the trajectory: caught before any cache is read, naming reset()."""
    trajectory = [999.0, 832.0, 666.0, 499.0, 333.0, 166.0]
    clock = StepClock(num_steps=6)
    for t in trajectory:
        clock.tick(t)
    for t in trajectory[:3]:
        clock.tick(t)
    with pytest.raises(StepMismatchError, match=r"steps 0–2 .*step 3 has 450 instead of 499.*reset\(\)"):
        clock.locate(450.0)
    clock.reset()
    assert clock.tick(450.0)[:2] == (0, 0)
