"""Context parallelism (diffusers' ``enable_parallelism`` with Ulysses degree 2) in two gloo
processes on the CPU: each rank captures its own graph, with the all-to-alls around attention as
ops inside the attention regions. A reused attention takes its collectives with it on every rank
at once (the schedule is static and the passes are the same on every rank), and the two ranks'
cached output (gathered by the model's own plan at ``proj_out``) equals one process's cached
output, over two generations.

The ranks run in processes spawned once for the module (a file store in a temporary folder, no
port); each writes its results to a file that the tests read. The one-process references are
computed there too, before context parallelism is enabled, each case's by one rank, on a model of
its own: the two processes share the work.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

import cachecompile as cc
from cachecompile.tools.bench.parallel import collective_bytes, generation_bytes
from tests.families import test_flux, test_wan
from tests.families._common import max_diff, mlp_rows, sample

pytest.importorskip("diffusers", minversion="0.36")
from diffusers import ContextParallelConfig  # noqa: E402

WORLD = 2
STEPS = 4
TIMEOUT_S = 240

# Flux splits the text tokens too: an even count.
FLUX_TEXT = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
FLUX_TXT_IDS = torch.zeros(6, 3)


def flux_kwargs(x, t):
    return {**test_flux.kwargs(x, t), "encoder_hidden_states": FLUX_TEXT, "txt_ids": FLUX_TXT_IDS}


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return test_flux.randomize_zero_parameters(FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=test_flux.DOUBLE, num_single_layers=test_flux.SINGLE,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ))


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return test_wan.randomize_zero_parameters(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=test_wan.LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ))


def _wan_split_at_embedding(model) -> dict:
    """Wan's plan with the sequence split where the patch embedding leaves it (along the frames, so
    each rank holds a contiguous half of the tokens, as the rotary embedding's split), instead of
    in the first block's forward hook: the block stack then starts from this rank's shard, and
    methods that pair the stack's input with its output (DBCache, TeaCache) find its stream."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    plan = {k: v for k, v in type(model)._cp_plan.items() if k != "blocks.0"}
    return {**plan, "patch_embedding": {0: ContextParallelInput(split_dim=2, expected_dims=5, split_output=True)}}


# family → (model, x0, kwargs, cp_plan: None for the model's own)
MODELS = {
    "flux": (_flux, test_flux.X0, flux_kwargs, None),
    "wan": (_wan, test_wan.X0, test_wan.kwargs, None),
    "wan-split": (_wan, test_wan.X0, test_wan.kwargs, _wan_split_at_embedding),
}
# name → (model, schedule); DuCa with fresh_ratio=1 recomputes every MLP row at conservative steps,
# so its result does not depend on how the tokens are split between ranks.
CASES = {
    "flux-fora2": ("flux", lambda: cc.Schedule.fora(STEPS, 2)),
    "flux-duca4": ("flux", lambda: cc.Schedule.duca(STEPS, 4, 1.0, score="random")),
    "wan-fora3": ("wan", lambda: cc.Schedule.fora(STEPS, 3)),
    # decided in the graph: the metric is all-reduced over the ranks before the branch
    "wan-dbcache": ("wan-split", lambda: cc.Schedule.dbcache(0.1, compute_first=1, num_steps=6)),
    # top-k per shard: each rank recomputes round(ratio × its tokens) of its own tokens
    "flux-toca-half": ("flux", lambda: cc.Schedule.toca(STEPS, 2, 0.5, score="random")),
    # a score from the attention's values: under Ulysses the attention holds the whole sequence
    "wan-vnorm-error": ("wan", lambda: cc.Schedule.toca(STEPS, 2, 0.5, score="v_norm")),
}
STATIC = ["flux-fora2", "flux-duca4", "wan-fora3"]
COMPARED = [*STATIC, "wan-dbcache"]  # equal to one process


def _collectives(gm: torch.fx.GraphModule) -> list[tuple[str, tuple[int, ...]]]:
    """Each collective of a step graph in order: its op and the shape of the tensor it sends."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "c10d" in str(n.target):
            val = n.args[0].meta.get("val") if isinstance(n.args[0], torch.fx.Node) else None
            out.append((n.target._schema.name.split("::")[-1], tuple(val.shape) if val is not None else ()))
    return out


def _collective_regions(cached) -> dict[str, list[str]]:
    """Each collective of the full step graph → the regions that hold it, blocks and branches
    (``blocks.<i>``, ``blocks.<i>.<branch>``; the stack holds all blocks)."""
    gm = next((gm for plan, gm in cached.step_graphs.items() if plan.is_full), None)
    if gm is None:
        return {}
    branches = [r for r in cached.region_map.regions.values() if r.name != "stack"]
    return {n.name: [r.name for r in branches if n.name in r.nodes]
            for n in gm.graph.nodes if n.op == "call_function" and "c10d" in str(n.target)}


def _rank(rank: int, store: str, out_dir: str) -> None:
    """One rank: enable context parallelism, then per case: uncached, and cached over two generations."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    # diffusers' _resolve_parallel_config picks this rank's device as rank % device_count(), which
    # divides by zero on a CPU build of torch (no accelerator): count the CPU as one.
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    results: dict = {"reference": {}}
    models = {}
    try:
        for name, (family, schedule) in [(c, CASES[c]) for c in COMPARED][rank::WORLD]:  # one process, no parallelism
            make, x0, kwargs, _ = MODELS[family]
            model, steps = make(), schedule().num_steps
            cached = cc.optimize(model, schedule())
            results["reference"][name] = dict(
                cached=sample(cached, x0, kwargs, steps), decisions=cached.decisions, uncached=sample(model, x0, kwargs, steps))
        for name, (family, schedule) in CASES.items():
            make, x0, kwargs, cp_plan = MODELS[family]
            if family not in models:
                models[family] = make()
                models[family].enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD),
                                                  cp_plan=cp_plan(models[family]) if cp_plan else None)
            model, steps = models[family], schedule().num_steps
            started = time.perf_counter()
            if name.endswith("-error"):
                with pytest.raises(Exception) as error:
                    sample(cc.optimize(model, schedule()), x0, kwargs, steps)
                results[name] = dict(error=f"{error.type.__name__}: {error.value}")
                continue
            cached = cc.optimize(model, schedule())
            outs = [sample(cached, x0, kwargs, steps) for _ in range(2)]
            graphs = [(plan.is_full, _collectives(gm)) for plan, gm in cached.step_graphs.items()]
            partial = [gm for plan, gm in cached.step_graphs.items() if any(a.kind == "partial" for _, a in plan.actions)]
            results[name] = dict(
                outputs=outs, decisions=cached.decisions, uncached=sample(model, x0, kwargs, steps), graphs=graphs,
                bytes_cached=generation_bytes(cached), bytes_uncached=steps * collective_bytes(
                    next(gm for plan, gm in cached.step_graphs.items() if plan.is_full)),
                mlp_rows=sorted(mlp_rows(partial[0], ".ff.")) if partial else None, regions=_collective_regions(cached), batched=[leaf.batched for leaf in cached.program.call.tensor_leaves],
                seconds=time.perf_counter() - started,
            )
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results: ``[rank0, rank1]``, each ``{case: {...}}``, and the one-process
    references ``{case: {"cached": ..., "uncached": ...}}`` as the last element."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("context_parallel")
    ctx = mp.start_processes(_rank, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):  # raises with the rank's traceback when one fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two ranks did not finish in {TIMEOUT_S} s")
    results = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return [*results, {case: ref for r in results for case, ref in r.pop("reference").items()}]


@pytest.mark.parametrize("case", COMPARED)
def test_two_ranks_match_one_process_over_two_generations(ranks, case):
    *ranks, reference = ranks
    expected, uncached = reference[case]["cached"], reference[case]["uncached"]
    for rank in ranks:
        got = rank[case]
        for out in got["outputs"]:
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["uncached"], uncached, rtol=0, atol=1e-5)
        assert got["decisions"] == reference[case]["decisions"]
        assert max_diff(got["outputs"][0], uncached) > 1e-3, "caching changed the result"


@pytest.mark.parametrize("case", STATIC)
def test_reused_attention_skips_its_collectives_on_every_rank(ranks, case):
    ranks = ranks[:WORLD]
    graphs = [rank[case]["graphs"] for rank in ranks]
    assert graphs[0] == graphs[1], "the ranks' step graphs issue different collectives"
    full = [c for is_full, c in graphs[0] if is_full]
    assert len(full) == 1
    # Ulysses: an all-to-all for q, k, v and the output of every attention, each waited on; the
    # gather of the output at proj_out
    a2a = [c for c in full[0] if c[0] == "all_to_all_single"]
    assert a2a and len(a2a) % 4 == 0
    assert [op for op, _ in full[0]][-2:] == ["all_gather_into_tensor", "wait_tensor"]
    for is_full, colls in graphs[0]:
        if not is_full:  # every attention is reused: only the output gather is left
            assert [op for op, _ in colls] == ["all_gather_into_tensor", "wait_tensor"]
    # every all-to-all and its wait lie in one block, 4 pairs per block, and in its attention
    # branch where the model has one (Flux's single-stream blocks merge attention and MLP in
    # proj_out: their branch is proj_out); the output gather lies in no region
    held = ranks[0][case]["regions"]
    names = list(held)
    assert held[names[-1]] == held[names[-2]] == []
    blocks = [next(r for r in regions if r.count(".") == 1) for regions in list(held.values())[:-2]]
    layers = test_wan.LAYERS if CASES[case][0] == "wan" else test_flux.DOUBLE + test_flux.SINGLE
    assert blocks == [f"blocks.{i}" for i in range(layers) for _ in range(8)]
    attention = {r for regions in held.values() for r in regions if r.count(".") == 2}
    assert attention == ({f"blocks.{i}.attn" for i in range(layers)} if CASES[case][0] == "wan" else {"blocks.0.attn"})
    assert not any(ranks[0][case]["batched"]), "a context-parallel model is captured with a static batch"


def test_communication_per_generation(ranks):
    """Bytes each rank hands to collectives per generation, as the bench counts them from the step
    graphs (``cachecompile.tools.bench.parallel``), against the count from the models' shapes: Ulysses sends q, k, v and the output of every parallel
    attention through an all-to-all (this rank's tokens × all heads, float32), and the output
    head gathers this rank's tokens. A reused attention's all-to-alls are communication saved."""
    def all_to_alls(attentions, tokens, heads_x_dim):
        return attentions * 4 * tokens * heads_x_dim * 4

    # Flux: joint attention over this rank's 8 image + 3 text tokens in all three blocks, 2 heads × 16;
    # the head gathers 8 tokens × 4 channels
    gather_flux = 16 // WORLD * 4 * 4
    flux = all_to_alls(test_flux.DOUBLE + test_flux.SINGLE, (16 + 6) // WORLD, 2 * 16) + gather_flux
    # Wan: self-attention over this rank's 16 of 2×4×4 patches, 2 heads × 12 (its cross-attention
    # reads the whole text on every rank and sends nothing); the head gathers 16 patches × 4 × 1×2×2
    gather_wan = 32 // WORLD * 16 * 4
    wan = all_to_alls(test_wan.LAYERS, 32 // WORLD, 2 * 12) + gather_wan
    full = {"flux-fora2": flux, "flux-duca4": flux, "wan-fora3": wan}
    # steps that compute attention: FORA:2 at 0, 2; DuCa:4 at 0; FORA:3 at 0, 3
    expected = {"flux-fora2": 2 * flux + 2 * gather_flux, "flux-duca4": flux + 3 * gather_flux,
                "wan-fora3": 2 * wan + 2 * gather_wan}
    for rank in ranks[:WORLD]:
        for case in STATIC:
            got = rank[case]
            assert got["bytes_uncached"] == STEPS * full[case], case
            assert got["bytes_cached"] == expected[case], case


def test_a_dynamic_decision_is_taken_alike_on_every_rank(ranks):
    """DBCache under context parallelism: each rank's probe is its half of the sequence; the
    metric's sums are all-reduced before the branch, so both ranks take the one-process
    decisions (checked against it above); the blocks it may skip keep their all-to-alls inside
    the branch, and only block 0's, the all-reduce and the gather are left outside."""
    decisions = ranks[-1]["wan-dbcache"]["decisions"]
    assert "cached" in decisions and decisions.count("full") > 1
    graphs = [rank["wan-dbcache"]["graphs"] for rank in ranks[:WORLD]]
    assert graphs[0] == graphs[1]
    dynamic = [[op for op, _ in colls] for is_full, colls in graphs[0] if not is_full]
    assert dynamic == [["all_to_all_single", "wait_tensor"] * 4 + ["all_reduce", "wait_tensor", "all_gather_into_tensor", "wait_tensor"]]


def test_partial_recompute_takes_the_top_k_of_each_shard(ranks):
    """ToCa at fresh_ratio 0.5 on Flux: each rank scores its own 8 image tokens and recomputes the
    MLP on round(0.5 × 8) = 4 of them (a one-process run recomputes 8 of 16 chosen over the whole
    sequence: the chosen tokens differ, so this result is not compared with one process). The
    partial step sends nothing but the output gather, and both ranks' graphs agree."""
    for rank in ranks[:WORLD]:
        got = rank["flux-toca-half"]
        assert got["mlp_rows"] == [round(0.5 * 16 / WORLD)]
        assert all(torch.isfinite(out).all() for out in got["outputs"])
        torch.testing.assert_close(got["outputs"][1], got["outputs"][0], rtol=0, atol=0)  # same each generation
        partial = [colls for is_full, colls in got["graphs"] if not is_full]
        assert partial and all([op for op, _ in colls] == ["all_gather_into_tensor", "wait_tensor"] for colls in partial)
    assert ranks[0]["flux-toca-half"]["graphs"] == ranks[1]["flux-toca-half"]["graphs"]


def test_a_value_norm_score_over_a_sharded_sequence_is_refused(ranks):
    """Wan's attention under Ulysses holds all 32 tokens (half the heads) while its MLP holds this
    rank's 16: v_norm cannot score the MLP's tokens, and says so before anything runs."""
    for rank in ranks[:WORLD]:
        error = rank["wan-vnorm-error"]["error"]
        assert error.startswith("TokenScoreError") and "(1, 32)" in error and "context parallelism" in error
