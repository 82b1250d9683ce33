"""GOC's used-value queue is refused where its error recursion grows (methods.compensation.check_used_queue_stable)."""

from __future__ import annotations

import pytest
import torch

import cachecompile as cc
from cachecompile.core.schedule import Layout

LAYOUT = Layout(branches=(("attn", "mlp"),) * 3)


def resolves(schedule: cc.Schedule) -> bool:
    try:
        schedule.resolve(LAYOUT)
    except cc.ScheduleError as e:
        assert "allow_divergence=True" in str(e) and "queue='computed'" in str(e)
        return False
    return True


@pytest.mark.parametrize(
    "interval, weight, stable",
    [
        (2, 0.8, True), (2, 1.0, True), (2, 1.2, False),  # gain w
        (3, 0.6, True), (3, 0.7, False), (3, 1.2, False),  # gain w + w²
        (4, 0.5, True), (4, 0.6, False),  # gain w + w² + w³
    ],
)
def test_used_queue_is_refused_where_the_gain_per_cycle_exceeds_one(interval, weight, stable):
    assert resolves(cc.Schedule.fora(50, interval, compensation=cc.GOC(weight))) is stable
    # the explicit opt-in runs it; the computed queue never feeds errors back
    assert resolves(cc.Schedule.fora(50, interval, compensation=cc.GOC(weight, allow_divergence=True)))
    assert resolves(cc.Schedule.fora(50, interval, compensation=cc.GOC(weight, queue="computed")))


def test_windows_and_skips_enter_the_gain():
    # interval 3, w = 0.8: gain 1.44 on every cycle with a gradient at both cached steps
    assert not resolves(cc.Schedule.fora(50, 3, compensation=cc.GOC(0.8, steps=(10, 11))))
    # no gradient at a cycle's first cached step: the second step has nothing to extrapolate (gain 0)
    assert resolves(cc.Schedule.fora(50, 3, compensation=cc.GOC(0.8, steps=tuple(range(2, 50, 3)))))
    assert resolves(cc.Schedule.fora(50, 3, compensation=cc.GOC(0.8, skip_steps=tuple(range(1, 50, 3)))))
    # a single cycle with gain 1.2 still hands on a larger error than it received
    assert not resolves(cc.Schedule.fora(20, 2, compensation=cc.GOC(1.2, steps=(3,))))


def test_the_opt_in_is_kept_in_the_schedule_file_and_only_there():
    risky = cc.Schedule.fora(50, 3, compensation=cc.GOC(1.2, allow_divergence=True))
    back = cc.Schedule.loads(risky.dumps())
    assert back == risky and back.compensation.allow_divergence
    assert "allow_divergence" not in cc.Schedule.fora(50, 2, compensation=cc.GOC(0.5)).dumps()
    assert not resolves(cc.Schedule.loads(risky.dumps().replace('"allow_divergence": true', '"allow_divergence": false')))


def test_refused_settings_really_diverge_on_the_digits_model():
    """The guard's verdict against sampling (50 DDIM steps, 4 samples, FORA interval 3): measured
    rel-L1 to the uncached samples FORA 0.021, used queue w = 0.5 (gain 0.75, accepted) 0.011,
    w = 0.8 (gain 1.44, refused) 0.11."""
    from cachecompile.tools import quality as Q
    from cachecompile.models import DIGITS_CONFIG as C, digits_dit
    from cachecompile.sampling import ddim_sample

    model = digits_dit()
    labels = torch.arange(4)
    kw = dict(num_steps=50, null_class=C.null_class, sample_size=C.sample_size, in_channels=C.in_channels)
    reference = ddim_sample(model, labels, **kw).clamp(-1, 1)

    def error(comp=None) -> float:
        out = ddim_sample(cc.optimize(model, cc.Schedule.fora(50, 3, compensation=comp)), labels, **kw)
        return Q.rel_l1(out.clamp(-1, 1), reference).item()

    fora = error()
    assert resolves(cc.Schedule.fora(50, 3, compensation=cc.GOC(0.5)))
    assert error(cc.GOC(0.5)) < fora
    assert not resolves(cc.Schedule.fora(50, 3, compensation=cc.GOC(0.8)))
    assert error(cc.GOC(0.8, allow_divergence=True)) > 2 * fora


def test_calibrate_skips_refused_weights_and_defaults_to_the_stable_queue(dit, labels, sample_kwargs):
    from cachecompile.calibration import DEFAULT_GOC_WEIGHTS

    inputs = {k: v for k, v in sample_kwargs.items() if k != "num_steps"} | {"class_labels": labels}
    sched, cal = cc.calibrate(dit, cc.Schedule.fora(12, 3), inputs, num_samples=1, compensation=cc.GOC(queue="used"),
                              weights=(0.3, 1.2), report=True)
    assert cal.search[1.2] == float("inf") and cal.search[0.3] < float("inf")  # 1.2 + 1.44 > 1: refused
    assert sched.compensation.weight == 0.3 and sched.compensation.queue == "used"
    with pytest.raises(cc.ScheduleError, match="every candidate weight"):
        cc.calibrate(dit, cc.Schedule.fora(12, 3), inputs, num_samples=1, compensation=cc.GOC(queue="used"), weights=(0.9, 1.2))
    sched, cal = cc.calibrate(dit, cc.Schedule.fora(12, 3), inputs, num_samples=1, compensation="goc", report=True)
    assert sched.compensation.queue == "computed" and sorted(cal.search) == sorted(DEFAULT_GOC_WEIGHTS)
    assert sched.compensation.weight == min(cal.search, key=cal.search.get)
