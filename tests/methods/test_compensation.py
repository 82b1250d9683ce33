"""GOC, EOC and Taylor over whole sampling runs, against independent eager references."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cachecompile as cc
from cachecompile.methods.compensation import Forecast, History, memory_report, taylor_coefficients
from cachecompile.sampling import ddim_sample
from tests.conftest import CountingModel, StepCounter, dit_inputs

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- eager references


class GOCReference(torch.nn.Module):
    """GOC on one branch, written directly from the rule: a list of the values used at every
    step (``queue="used"``) or of the computed ones with their steps (``queue="computed"``)."""

    def __init__(self, inner, counter, interval, weight, skip=(), queue="used"):
        super().__init__()
        self.inner, self.counter, self.interval, self.w, self.skip, self.queue = inner, counter, interval, weight, skip, queue
        self.used, self.computed = [], []

    def forward(self, *args, **kwargs):
        s = self.counter.step
        if s == 0:
            self.used, self.computed = [], []
        if s % self.interval == 0:
            out = self.inner(*args, **kwargs)
            self.computed.append((s, out))
        elif self.queue == "used":
            u1 = self.used[-1]
            out = u1 + self.w * (u1 - self.used[-2]) if len(self.used) >= 2 and s not in self.skip else u1
        else:
            (c0, f0) = self.computed[-1]
            if len(self.computed) >= 2:
                c1, f1 = self.computed[-2]
                n = sum(1 for t in range(c0 + 1, s + 1) if t not in self.skip)
                out = f0 + (self.w * n / (c0 - c1)) * (f0 - f1)
            else:
                out = f0
        self.used.append(out)
        return out


class EOCReference(torch.nn.Module):
    """EOC on one branch: ``cached * (1 + theta * E[s])`` at the judged cached steps."""

    def __init__(self, inner, counter, interval, theta, trend, judged=None):
        super().__init__()
        self.inner, self.counter, self.interval, self.theta, self.trend, self.judged = inner, counter, interval, theta, trend, judged
        self.cached = None

    def forward(self, *args, **kwargs):
        s = self.counter.step
        if s % self.interval == 0:
            self.cached = self.inner(*args, **kwargs)
            return self.cached
        if self.judged is not None and s not in self.judged:
            return self.cached
        return self.cached * (1 + self.theta * self.trend[s])


def wrap_branches(model, make):
    ref = copy.deepcopy(model)
    counter = StepCounter()
    for i, block in enumerate(ref.transformer_blocks):
        block.attn1 = make(block.attn1, counter, f"blocks.{i}.attn")
        block.ff = make(block.ff, counter, f"blocks.{i}.mlp")
    return CountingModel(ref, counter)


def run_both(dit, labels, sample_kwargs, schedule, ref, generations=2):
    cached = cc.optimize(dit, schedule)
    outs = []
    for _ in range(generations):
        ref.counter.calls = 0
        expected = ddim_sample(ref, labels, **sample_kwargs)
        got = ddim_sample(cached, labels, **sample_kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        outs.append(got)
    # no state leaks between generations: the second run repeats the first exactly
    torch.testing.assert_close(outs[0], outs[-1], rtol=0, atol=0)
    return cached, outs[0]


@pytest.fixture(scope="module")
def fora_samples(dit, labels, sample_kwargs):
    return {n: ddim_sample(cc.optimize(dit, cc.Schedule.fora(12, n)), labels, **sample_kwargs) for n in (2, 3)}


# --------------------------------------------------------------------------- GOC


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("skip", [(), (5, 8)])
def test_goc_used_queue_matches_eager_reference(dit, labels, sample_kwargs, fora_samples, interval, skip):
    w = 0.8
    ref = wrap_branches(dit, lambda m, c, r: GOCReference(m, c, interval, w, skip))
    # the used queue at w = 0.8, interval 3, is refused as divergent: this test checks its mechanics
    comp = cc.GOC(w, skip_steps=skip, allow_divergence=True)
    cached, out = run_both(dit, labels, sample_kwargs, cc.Schedule.fora(12, interval, compensation=comp), ref)
    assert (out - fora_samples[interval]).abs().max() > 1e-3, "the compensation changed nothing"
    assert len(cached.step_graphs) == 3  # first compute, compute, cached: whatever the step count


def test_goc_skip_steps_change_the_result(dit, labels, sample_kwargs):
    run = lambda skip: ddim_sample(cc.optimize(dit, cc.Schedule.fora(12, 3, compensation=cc.GOC(1.0, skip_steps=skip, allow_divergence=True))), labels, **sample_kwargs)  # noqa: E731
    assert (run(()) - run((5,))).abs().max() > 1e-4


@pytest.mark.parametrize("interval", [2, 3])
def test_goc_computed_queue_matches_eager_reference(dit, labels, sample_kwargs, interval):
    w, skip = 1.2, (7,)
    ref = wrap_branches(dit, lambda m, c, r: GOCReference(m, c, interval, w, skip, queue="computed"))
    run_both(dit, labels, sample_kwargs, cc.Schedule.fora(12, interval, compensation=cc.GOC(w, skip_steps=skip, queue="computed")), ref)


def test_goc_per_region_skip_steps_and_window(dit, labels, sample_kwargs):
    """Skip steps per region; a window (``steps``) acts as skipping every step outside it."""
    skips = {"blocks.0.attn": (4,), "blocks.2.mlp": (7, 10)}
    window = tuple(range(3, 9))
    outside = tuple(s for s in range(12) if s not in window)
    ref = wrap_branches(dit, lambda m, c, r: GOCReference(m, c, 3, 1.0, tuple(skips.get(r, ())) + outside))
    comp = cc.GOC(1.0, skip_steps=skips, steps=window, allow_divergence=True)
    run_both(dit, labels, sample_kwargs, cc.Schedule.fora(12, 3, compensation=comp), ref, generations=1)


def test_goc_doubles_the_cache(dit, labels, sample_kwargs):
    plain = cc.optimize(dit, cc.Schedule.fora(12, 3))
    goc = cc.optimize(dit, cc.Schedule.fora(12, 3, compensation=cc.GOC(allow_divergence=True)))
    ddim_sample(plain, labels, **sample_kwargs)
    ddim_sample(goc, labels, **sample_kwargs)
    assert goc.cache_bytes == 2 * plain.cache_bytes > 0
    rep = memory_report(goc)
    assert rep.plain_bytes == plain.cache_bytes and rep.cache_bytes == goc.cache_bytes
    assert rep.extra_bytes == plain.cache_bytes and rep.prior_bytes == 0
    assert cc.GOC().extra_slots() == 1 and cc.Taylor(2).extra_slots() == 2


def test_step_graph_count_does_not_grow_with_steps(dit):
    kw = dit_inputs(batch=4)
    for comp, graphs in [(cc.GOC(allow_divergence=True), 3), (cc.Taylor(2), 3), (cc.EOC(prior={"blocks.0.attn": torch.zeros(1, 16)}), 2)]:
        counts = []
        for n in (12, 30):
            if isinstance(comp, cc.EOC):
                comp = cc.EOC(prior={"blocks.0.attn": torch.zeros(n, 16)})
            cached = cc.optimize(dit, cc.Schedule.fora(n, 3, compensation=comp), example_kwargs=kw)
            counts.append(len(cached.step_graphs))
        assert counts == [graphs, graphs], comp


# --------------------------------------------------------------------------- EOC


def _hand_prior(steps=12, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.{k}": torch.randn(steps, channels, generator=g) for i in range(3) for k in ("attn", "mlp")}


def test_eoc_theta_zero_is_plain_caching(dit, labels, sample_kwargs, fora_samples):
    sched = cc.Schedule.fora(12, 3, compensation=cc.EOC(theta=0.0, prior=_hand_prior()))
    out = ddim_sample(cc.optimize(dit, sched), labels, **sample_kwargs)
    torch.testing.assert_close(out, fora_samples[3], rtol=0, atol=0)


@pytest.mark.parametrize("judged", [None, {"blocks.0.attn": (1, 5), "blocks.1.mlp": (2, 4, 8, 11)}])
def test_eoc_matches_eager_reference(dit, labels, sample_kwargs, fora_samples, judged):
    prior, theta = _hand_prior(), 0.05
    ref = wrap_branches(
        dit, lambda m, c, r: EOCReference(m, c, 3, theta, prior[r], None if judged is None else judged.get(r, ()))
    )
    cached, out = run_both(dit, labels, sample_kwargs, cc.Schedule.fora(12, 3, compensation=cc.EOC(theta, prior=prior, judged=judged)), ref)
    assert (out - fora_samples[3]).abs().max() > 1e-4
    assert len(cached.step_graphs) == 2
    rep = memory_report(cached)
    assert rep.prior_bytes == 6 * 12 * 16 * 4 and rep.extra_bytes == rep.prior_bytes


def test_eoc_full_prior_form(dit, labels, sample_kwargs):
    """A full-form prior ``[steps, *feature]`` works like the per-channel one broadcast."""
    chan = _hand_prior()
    full = {r: e[:, None, None, :].expand(12, 4, 16, 16).contiguous() for r, e in chan.items()}
    run = lambda p: ddim_sample(cc.optimize(dit, cc.Schedule.fora(12, 3, compensation=cc.EOC(0.05, prior=p))), labels, **sample_kwargs)  # noqa: E731
    torch.testing.assert_close(run(full), run(chan), rtol=0, atol=1e-6)


def test_eoc_regions_without_prior_stay_plain(dit):
    sched = cc.Schedule.fora(12, 3, compensation=cc.EOC(prior={"blocks.1.mlp": torch.zeros(12, 16)}))
    cached = cc.optimize(dit, sched, example_kwargs=dit_inputs(batch=4))
    acts = dict(cached.plans[1].actions)
    assert acts["blocks.1.mlp"].kind == "forecast" and acts["blocks.0.attn"].kind == "reuse"


# --------------------------------------------------------------------------- Taylor


class Branch(torch.nn.Module):
    """``lin(h) + f(t)·v``: linear in the hidden state, ``f`` chosen by the test."""

    def __init__(self, dim, f, weight, v):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim, bias=False)
        self.f = f
        with torch.no_grad():
            self.lin.weight.copy_(weight)
        self.v = torch.nn.Parameter(v, requires_grad=False)

    def forward(self, h, t):
        return self.lin(h) + self.f(t)[:, None, None] * self.v


class ToyBlock(torch.nn.Module):
    def __init__(self, attn, mlp):
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, h, t):
        h = h + self.attn(h, t)
        return h + self.mlp(h, t)


class Toy(torch.nn.Module):
    """A transformer-shaped toy ``model(x [B, T, C], t [B]) -> [B, T, C]`` with exact values."""

    def __init__(self, fa, fm, blocks=2, dim=4, mlp_weight=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        dyadic = lambda *s: torch.randint(-2, 3, s, generator=g).float() / 4  # noqa: E731  exact in float32
        self.blocks = torch.nn.ModuleList(
            ToyBlock(
                Branch(dim, fa, dyadic(dim, dim), dyadic(dim)),
                Branch(dim, fm, dyadic(dim, dim) if mlp_weight else torch.zeros(dim, dim), dyadic(dim)),
            )
            for _ in range(blocks)
        )

    def forward(self, x, t):
        for b in self.blocks:
            x = b(x, t)
        return x


TOY_REGIONS = cc.RegionPatterns(blocks=("blocks.*",), branches={"attn": "attn", "mlp": "mlp"})


def toy_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (2, 3, 4), generator=g).float()


def run_toy(model, steps, x, t_of=float):
    return [model(x, torch.full((2,), t_of(s))) for s in range(steps)]


@pytest.mark.parametrize("interval", [2, 3])
def test_taylor_first_order_reproduces_linear_features(interval):
    toy = Toy(lambda t: t, lambda t: 2 * t)  # every region is affine in the step
    x = toy_inputs()
    expected = run_toy(toy, 12, x)
    got = run_toy(cc.optimize(toy, cc.Schedule.fora(12, interval, compensation=cc.Taylor(1)), regions=TOY_REGIONS), 12, x)
    plain = run_toy(cc.optimize(toy, cc.Schedule.fora(12, interval), regions=TOY_REGIONS), 12, x)
    for s in range(12):
        if s < interval + 1:  # fewer than two computed values: plain reuse
            assert torch.equal(got[s], plain[s])
        elif interval == 2:
            assert torch.equal(got[s], expected[s]), s  # step ratio 1/2: exact in float
        else:
            torch.testing.assert_close(got[s], expected[s], rtol=0, atol=1e-5)
    assert any((p - e).abs().max() > 0.1 for p, e in zip(plain, expected)), "plain caching is not exact here"


def test_taylor_second_order_reproduces_quadratic_features():
    toy = Toy(lambda t: t * t, lambda t: t, blocks=1, mlp_weight=False)
    x = toy_inputs()
    expected = run_toy(toy, 12, x)
    got = run_toy(cc.optimize(toy, cc.Schedule.fora(12, 2, compensation=cc.Taylor(2)), regions=TOY_REGIONS), 12, x)
    first = run_toy(cc.optimize(toy, cc.Schedule.fora(12, 2, compensation=cc.Taylor(1)), regions=TOY_REGIONS), 12, x)
    for s in (5, 7, 9, 11):  # three computed values exist from step 5 on
        torch.testing.assert_close(got[s], expected[s], rtol=0, atol=1e-4)
        assert (first[s] - expected[s]).abs().max() > 0.1


def test_taylor_coefficients_follow_true_step_distances():
    # polynomial through (4, F0), (1, F1): F0 + (s − 4)/3 · (F0 − F1)
    assert taylor_coefficients(6, [4, 1]) == pytest.approx((2 / 3, 0.0))
    # uneven second order reproduces t² exactly
    c = [7, 3, 2]
    f = {t: t * t for t in c}
    a, b = taylor_coefficients(9, c)
    assert f[7] + a * (f[7] - f[3]) + b * (f[3] - f[2]) == pytest.approx(81)


# --------------------------------------------------------------------------- schedules and errors


def test_compensated_schedules_round_trip_through_files(tmp_path):
    comps = [
        cc.GOC(1.1, skip_steps=(3, 7), queue="computed", steps=(2, 3, 4)),
        cc.GOC(0.9, skip_steps={"blocks.0.attn": [5, 4]}),
        cc.Taylor(2),
        cc.EOC(0.02, prior=_hand_prior(), threshold=0.1, judged={"blocks.2.mlp": [4, 1]}),
    ]
    for i, comp in enumerate(comps):
        for sched in (
            cc.Schedule.fora(12, 3, compensation=comp),
            cc.Schedule.from_mask([[[1, 1]] * 3] + [[[0, 1]] * 3] * 11, compensation=comp),
        ):
            path = tmp_path / f"s{i}.json"
            sched.save(path)
            back = cc.Schedule.load(path)
            assert back == sched and hash(back) == hash(sched)
            assert type(back.compensation) is type(comp)
    prior = cc.Schedule.load(path).compensation.prior_tensor("blocks.1.attn")
    assert torch.equal(prior, _hand_prior()["blocks.1.attn"])
    assert "tables" in repr(comps[-1]) and len(repr(comps[-1])) < 200


def test_schedule_file_loads_in_a_fresh_process(tmp_path):
    path = tmp_path / "goc.json"
    cc.Schedule.fora(12, 3, compensation=cc.GOC(1.0, skip_steps=(4,))).save(path)
    code = f"import cachecompile as cc; s = cc.Schedule.load({str(path)!r}); print(s.compensation.skip_steps)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(4,)"


def test_forecast_actions_round_trip_in_explicit_schedules():
    steps = [{}, {"blocks.0.attn": Forecast(method="goc", queue="used")}, {"blocks.0.attn": History(state=("history1",))}]
    s = cc.Schedule.explicit(steps)
    assert cc.Schedule.loads(s.dumps()) == s


def test_bad_compensations_are_clear_errors(dit):
    with pytest.raises(cc.ScheduleError, match="queue must be 'used'"):
        cc.GOC(queue="last")
    with pytest.raises(cc.ScheduleError, match="finite number"):
        cc.GOC(weight=float("nan"))
    with pytest.raises(cc.ScheduleError, match="order must be 1 or 2"):
        cc.Taylor(3)
    kw = dit_inputs(batch=4)
    cases = [
        (cc.EOC(), "EOC needs a prior.*cc.calibrate"),
        (cc.EOC(prior={"blocks.0.attn": torch.zeros(5, 16)}), "5 rows but the schedule has 12 steps"),
        (cc.EOC(prior={"blocks.9.attn": torch.zeros(12, 16)}), r"does not have.*cc.calibrate"),
        (cc.GOC(skip_steps=(12,)), "outside|12 steps"),
        (cc.EOC(prior={"blocks.0.attn": torch.zeros(12, 7)}), r"rows of shape \[7\].*feature has shape \[batch, 16, 16\]"),
    ]
    for comp, msg in cases:
        cached = cc.optimize(dit, cc.Schedule.fora(12, 3, compensation=comp))
        with pytest.raises(ValueError, match=msg):
            cached(**kw, return_dict=False)
        assert not cached.is_captured and cached.step_graphs == {}


def test_presets_accept_compensation():
    comp = cc.GOC()
    assert cc.Schedule.fora(4, 2, compensation=comp).compensation is comp
    assert cc.Schedule.from_mask([[[1, 1]], [[0, 0]]], compensation=comp).compensation is comp
    assert cc.Schedule.explicit([{}, {"blocks.0.attn": "reuse"}], compensation=comp).compensation is comp
    assert cc.Schedule.fora(4, 2).with_compensation(comp).compensation is comp


def test_compensation_leaves_partial_and_shadowed_regions_alone():
    from cachecompile.methods.compensation import compensable_regions
    from cachecompile.core.schedule import REUSE, Action

    partial = Action(kind="partial")
    rules = [{}, {"blocks.0.attn": REUSE, "blocks.0.mlp": partial, "blocks.1.attn": REUSE}, {"blocks.1": REUSE}, {"blocks.0.mlp": REUSE}]
    assert compensable_regions(rules) == ["blocks.0.attn", "blocks.1"]


def test_compensation_that_changes_nothing_is_an_error(dit):
    kw = dit_inputs(batch=4)
    for sched in (
        cc.Schedule.fora(12, 1, compensation=cc.GOC()),
        cc.Schedule.duca(12, 4, 0.25, aggressive_reuse="residual", compensation=cc.Taylor(1)),
    ):
        with pytest.raises(cc.ScheduleError, match="nothing to compensate"):
            cc.optimize(dit, sched, example_kwargs=kw)


def test_toca_with_goc_keeps_both_states(dit, labels, sample_kwargs):
    """ToCa scores tokens by state recorded at compute steps; GOC keeps its history there too."""
    sched = cc.Schedule.toca(12, 3, 0.25, compensation=cc.GOC(0.5))
    cached = cc.optimize(dit, sched)
    first, again = ddim_sample(cached, labels, **sample_kwargs), ddim_sample(cached, labels, **sample_kwargs)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    state = dict(cached.plans[3].actions)["blocks.0.attn"].state
    assert "history1" in state and "v_norm" in state
    assert dict(cached.plans[1].actions)["blocks.0.attn"].kind == "forecast"
    assert dict(cached.plans[1].actions)["blocks.0.mlp"].kind == "partial"
    plain = ddim_sample(cc.optimize(dit, cc.Schedule.toca(12, 3, 0.25)), labels, **sample_kwargs)
    assert (first - plain).abs().max() > 1e-4
