"""``cc.cache_bytes`` / ``Schedule.cache_bytes``: the cache store's size, known before running,
against the most the store really held in a generation; and how long the store holds values."""

import copy

import pytest
import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample, first_call_kwargs
from tests.conftest import NULL_CLASS, TINY_DIT
from tests.families._common import sample

STEPS = 7
SAMPLE = dict(num_steps=STEPS, guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4, seed=0)

SCHEDULES = {
    "fora-unbound": cc.Schedule.fora(interval=3),
    "duca-partial": cc.Schedule.duca(STEPS, 3, 0.5),
    "toca-staleness": cc.Schedule.toca(STEPS, 2, 0.25, score="v_norm+0.25*staleness"),
    "mask": cc.Schedule.from_mask([[[1, 1]] * 3] + [[[0, 1], [1, 0], [0, 0]]] * (STEPS - 1)),
    "taylor-history": cc.Schedule.fora(STEPS, 3, compensation=cc.Taylor(order=2)),
    "dbcache-dynamic": cc.Schedule.dbcache(0.1, warmup_steps=1, num_steps=STEPS),
    "fora-bf16": cc.Schedule.fora(interval=3, cache_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name,batch", [(n, 3) for n in SCHEDULES] + [("fora-unbound", 1), ("duca-partial", 1), ("dbcache-dynamic", 2)])
def test_prediction_is_the_store_allocation_dit(dit, name, batch):
    schedule = SCHEDULES[name]
    labels = torch.arange(batch)
    example = first_call_kwargs(dit, labels, **SAMPLE)  # the CFG batch: 2 × batch
    predicted = schedule.cache_bytes(dit, example, num_steps=STEPS)
    cached = cc.optimize(dit, schedule)
    ddim_sample(cached, labels, **SAMPLE)
    assert predicted == cached.cache_bytes > 0


def test_fora_prediction_is_two_branches_per_block(dit):
    """An independent count: FORA keeps every block's attention and MLP output, B × tokens × hidden."""
    batch, tokens, hidden = 6, (TINY_DIT["sample_size"] // TINY_DIT["patch_size"]) ** 2, 16
    example = first_call_kwargs(dit, torch.arange(batch // 2), **SAMPLE)
    one = batch * tokens * hidden * TINY_DIT["num_layers"] * 2
    assert cc.cache_bytes(dit, cc.Schedule.fora(STEPS, 3), example) == one * 4
    assert cc.cache_bytes(dit, cc.Schedule.fora(STEPS, 3, cache_dtype=torch.float16), example) == one * 2
    assert cc.cache_bytes(dit, cc.Schedule.fora(STEPS, 3, cache_dtype=torch.float8_e4m3fn), example) == one
    assert cc.cache_bytes(dit, cc.Schedule.fora(STEPS, 3), example, calls_per_step=2) == one * 8
    assert cc.cache_bytes(dit, cc.Schedule.fora(STEPS, 1), example) == 0  # nothing reused, nothing kept


def test_the_store_holds_a_value_until_its_last_read(dit):
    """FORA every 3 steps over 7: steps 0, 3 and 6 compute, 1, 2, 4 and 5 read what 0 and 3 wrote.
    The values are held from their write to their last read (through steps 0-1 and 3-4); after
    step 2 the next full step rewrites them and after step 5 nothing reads them: the store is
    empty, and it stays empty between generations."""
    example = first_call_kwargs(dit, torch.arange(2), **SAMPLE)
    predicted = cc.cache_bytes(dit, cc.Schedule.fora(STEPS, 3), example)
    cached = cc.optimize(dit, cc.Schedule.fora(STEPS, 3))
    held, outs = [], []
    for generation in range(2):
        outs.append(ddim_sample(_Probe(cached, held), torch.arange(2), **SAMPLE))
        assert cached._store.nbytes == 0 and cached.cache_bytes == predicted
    full = [predicted, predicted, 0]
    assert held == (full * 2 + [0]) * 2
    assert torch.equal(outs[0], outs[1])  # the second generation reads only what it wrote


class _Probe(torch.nn.Module):
    """The cached model, with the bytes its store holds after each call written down."""

    def __init__(self, cached, held):
        super().__init__()
        self.cached, self.held = cached, held

    def forward(self, *args, **kwargs):
        out = self.cached(*args, **kwargs)
        self.held.append(self.cached._store.nbytes)
        return out


def test_the_model_is_left_as_it_was(dit):
    model = copy.deepcopy(dit)
    params = {n: (id(p), p.clone()) for n, p in model.named_parameters()}
    modules = [(n, type(m), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
    example = first_call_kwargs(model, torch.arange(2), **SAMPLE)
    before = model(**example)[0]
    cc.Schedule.duca(STEPS, 3, 0.5).cache_bytes(model, example)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: i for n, (i, _) in params.items()}
    assert all(torch.equal(p, params[n][1]) for n, p in model.named_parameters())
    assert [(n, type(m), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()] == modules
    assert torch.equal(model(**example)[0], before)


def test_an_unbound_schedule_needs_a_length(dit):
    example = first_call_kwargs(dit, torch.arange(1), **SAMPLE)
    with pytest.raises(cc.ScheduleError, match="num_steps="):
        cc.Schedule.fora(interval=3).cache_bytes(dit, example)
    with pytest.raises(cc.StepMismatchError):
        cc.Schedule.fora(STEPS, 3).cache_bytes(dit, example, num_steps=STEPS + 1)


@pytest.fixture(scope="module")
def pixart():
    from tests.pipelines._components import tiny_pixart

    return tiny_pixart()


def _pixart_call(batch):
    g = torch.Generator().manual_seed(batch)
    text = torch.randn(batch, 5, 32, generator=g)

    def kwargs(x, t):
        return dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((batch,), 999.0 * t),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    return torch.randn(batch, 4, 8, 8, generator=g), kwargs


@pytest.mark.parametrize("schedule", [cc.Schedule.fora(interval=2), cc.Schedule.duca(4, 3, 1.0, score="random"),
                                      cc.Schedule.fora(4, 2, cache_dtype=torch.bfloat16)], ids=["fora", "duca", "fora-bf16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_prediction_is_the_store_allocation_pixart(pixart, schedule, batch):
    x0, kwargs = _pixart_call(batch)
    predicted = cc.cache_bytes(pixart, schedule, kwargs(x0, 1.0), num_steps=4)
    cached = cc.optimize(pixart, schedule)
    sample(cached, x0, kwargs, 4)
    assert predicted == cached.cache_bytes > 0
