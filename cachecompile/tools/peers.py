"""Peers for the bench: other cache libraries, run on the same model, seeds and steps.

Each peer is a :class:`PeerModel`: a deep copy of the user's model with the peer's own hooks
applied, called exactly like the transformer (so :func:`cachecompile.sampling.ddim_sample` runs
it unchanged), starting a new generation every ``num_steps`` calls. ``peer.compile()`` puts the
hooked model under ``torch.compile`` (not ``fullgraph``: the peers' Python-side decisions would
refuse to compile; their graph breaks are what the bench counts).

Peers (optional, the ``bench`` extra installs cache-dit; diffusers ships the hooks):

=====================  =======================================================================
``cache-dit``          cache-dit ``DBCacheConfig`` with its dynamic residual-difference threshold
                       (the settings of a ``dbcache`` schedule when given one: same decisions)
``cache-dit-mask``     cache-dit with a static ``steps_computation_mask`` equal to our schedule's
                       full steps (same compute mask as FORA)
``fbc``                diffusers ``apply_first_block_cache`` (a First-Block-Cache ``dbcache``
                       schedule's threshold when given one)
``taylorseer``         diffusers ``apply_taylorseer_cache`` on every ``attn1``/``ff``
``magcache``           diffusers ``apply_mag_cache``, calibrated in the bench by one uncached run
                       (or a ``magcache`` schedule's ratios and settings)
``pab``                diffusers ``apply_pyramid_attention_broadcast`` on every ``attn1``
=====================  =======================================================================

A peer that cannot run raises :class:`PeerUnavailable` with the reason (library missing, model
not supported); the bench reports it as a row with that reason.

Example::

    >>> from cachecompile.tools.peers import build_peer       # doctest: +SKIP
    >>> peer = build_peer("cache-dit-mask", model, num_steps=20, interval=3)
    >>> images = ddim_sample(peer, labels, num_steps=20, ...)
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.metadata
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cachecompile.tools.measure import isolated_compile

__all__ = ["PEERS", "PeerModel", "PeerUnavailable", "build_peer", "matches_schedule", "peer_names", "probe_export"]


class PeerUnavailable(RuntimeError):
    """The peer cannot run here: its library is missing or it does not support the model."""


@dataclass
class PeerSpec:
    name: str
    library: str  # the distribution that provides it
    describe: str
    uses_interval: bool  # configured from the schedule's interval (one row per interval)
    build: Callable[..., "PeerModel"]


class PeerModel(torch.nn.Module):
    """A hooked copy of the model, called like the transformer; one call = one sampling step.

    ``before_call(step, kwargs)`` runs before every call outside any compiled region (where
    diffusers' hooks get their cache context); ``step_kinds`` labels each step where the peer's
    rule is known in advance (``None`` for dynamic peers).
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        num_steps: int,
        *,
        label: str,
        step_kinds: list[str] | None = None,
        before_call: Callable[[int, dict], None] | None = None,
        after_call: Callable[[], None] | None = None,
        notes: list[str] | None = None,
        info: Callable[[], dict] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.label = label
        self.model = model
        self.num_steps = num_steps
        self.step_kinds = step_kinds
        self.notes = list(notes or [])
        self._before = before_call
        self._after = after_call
        self._info = info
        self._call: Callable[..., Any] = model
        self.compiled = False
        self.calls = 0

    def compile(self) -> "PeerModel":
        """Run the hooked model under ``torch.compile`` from now on (compiles on the next call).

        Default options (not ``fullgraph``); its compiled entries are kept apart from other
        compiled models in the process (``isolate_recompiles``), so its recompiles are its own.
        """
        self._call = isolated_compile(self.model)
        self.compiled = True
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        step = self.calls % self.num_steps
        if self._before is not None:
            self._before(step, kwargs)
        try:
            return self._call(*args, **kwargs)
        finally:
            if self._after is not None:
                self._after()
            self.calls += 1

    def info(self) -> dict:
        """What the peer reports about its last run (cached steps ...), JSON-able."""
        return self._info() if self._info is not None else {}


# --------------------------------------------------------------------------- helpers


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise PeerUnavailable(f"{dist} is not installed: pip install 'cachecompile[bench]' (or pip install {dist})")


def _check_dit_blocks(model: torch.nn.Module) -> None:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise PeerUnavailable(f"{type(model).__name__} has no transformer_blocks ModuleList; the peers hook DiT-style blocks")


def _fora_kinds(num_steps: int, interval: int, cached: str = "cached") -> list[str]:
    return ["full" if s % interval == 0 else cached for s in range(num_steps)]


@contextlib.contextmanager
def _quiet_cache_dit():
    """cache-dit logs every config at INFO; keep the bench's stdout table readable."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# --------------------------------------------------------------------------- cache-dit


def _cache_dit(
    model: torch.nn.Module, num_steps: int, mask: list[int] | None, interval: int | None, settings: dict | None = None
) -> PeerModel:
    version = _version("cache-dit")
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    import cache_dit
    from cache_dit import DBCacheConfig

    _check_dit_blocks(model)
    m = copy.deepcopy(model)
    common = dict(
        # cache-dit's minimum: a cached step still runs the first block (Fn >= 1 is asserted),
        # the closest it gets to FORA's "reuse every block".
        Fn_compute_blocks=1,
        Bn_compute_blocks=0,
        num_inference_steps=num_steps,  # refreshes the context after each generation
        enable_separate_cfg=False,  # CFG runs as one batched call
    )
    if settings is not None:  # a dbcache schedule's settings: the same policy
        common.update(Fn_compute_blocks=settings["compute_first"], Bn_compute_blocks=settings["compute_last"])
        limits = {k: -1 if settings.get(p) is None else settings[p] for k, p in
                  (("max_cached_steps", "max_cached_steps"), ("max_continuous_cached_steps", "max_continuous_cached_steps"))}
        cfg = DBCacheConfig(**common, max_warmup_steps=settings["warmup_steps"],
                            residual_diff_threshold=settings["threshold"], **limits)
        kinds = None
        label = (f"cache-dit {version} DBCache F{settings['compute_first']}B{settings['compute_last']} "
                 f"W{settings['warmup_steps']} dynamic (threshold {settings['threshold']:g})")
    elif mask is None:
        cfg = DBCacheConfig(**common, max_warmup_steps=max(1, num_steps // 5), residual_diff_threshold=0.08)
        kinds = None
        label = f"cache-dit {version} DBCache F1B0 dynamic (threshold 0.08)"
    else:
        cfg = DBCacheConfig(**common, steps_computation_mask=list(mask), steps_computation_policy="static", max_warmup_steps=0)
        kinds = ["full" if c else "cached" for c in mask]
        shown = f"interval {interval}" if interval else "mask " + "".join(map(str, mask))
        label = f"cache-dit {version} DBCache F1B0 static mask ({shown})"
    with _quiet_cache_dit():
        cache_dit.enable_cache(m, cache_config=cfg)

    def before(step: int, kwargs: dict) -> None:
        # A transformer-only context refreshes itself one call late (when a call finds the step
        # counter already past num_inference_steps), so without this the first step of every
        # later generation reused the previous generation's cache. Refresh at each step 0, as
        # cache-dit documents for transformer-only use.
        if step == 0:
            with _quiet_cache_dit():
                cache_dit.refresh_context(m, cache_config=copy.deepcopy(cfg))

    def info() -> dict:
        with _quiet_cache_dit():
            stats = cache_dit.summary(m)
        stats = stats[0] if isinstance(stats, list) and stats else stats
        return {"cached_steps": list(getattr(stats, "cached_steps", []) or []), "config": cfg.strify()}

    notes = [
        "Fn_compute_blocks >= 1: every cached step still runs block 0 (1/L of the blocks)",
        "step decisions run in Python (torch.compiler.disable): graph breaks under torch.compile",
        "no fullgraph torch.compile, no AOTInductor/ONNX artifact: the cache lives in Python state",
    ]
    notes.append("transformer-only use: the bench calls refresh_context at every step 0 (its own refresh comes one call late)")
    return PeerModel(
        "cache-dit-mask" if mask else "cache-dit", m, num_steps, label=label, step_kinds=kinds, before_call=before,
        notes=notes, info=info,
    )


def _build_cache_dit(model: torch.nn.Module, *, num_steps: int, settings: dict | None = None, **_: Any) -> PeerModel:
    return _cache_dit(model, num_steps, None, None, settings)


def _build_cache_dit_mask(
    model: torch.nn.Module, *, num_steps: int, interval: int | None = None, mask: list[int] | None = None, **_: Any
) -> PeerModel:
    if mask is None:
        mask = [1 if s % interval == 0 else 0 for s in range(num_steps)]  # type: ignore[operator]
    if len(mask) != num_steps or mask[0] != 1:
        raise ValueError(f"a steps mask needs {num_steps} entries of 0/1 starting with 1, got {mask}")
    return _cache_dit(model, num_steps, list(mask), interval)


# --------------------------------------------------------------------------- diffusers hooks


def _diffusers_peer(
    name: str,
    model: torch.nn.Module,
    num_steps: int,
    apply: Callable[[torch.nn.Module, Callable[[], int]], None],
    *,
    label: str,
    step_kinds: list[str] | None,
    notes: list[str],
    leader_hook: str | None = None,
) -> PeerModel:
    version = _version("diffusers")
    try:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
    except ImportError as e:  # the cache-context API moved or is older than the bench knows
        raise PeerUnavailable(f"diffusers {version} has no hooks cache-context API ({e})")
    _check_dit_blocks(model)
    m = copy.deepcopy(model)
    now = {"t": 0, "step": 0}
    apply(m, lambda: now["t"])
    computed: list[int] = []  # steps whose blocks ran: the dynamic peers' decisions, from their hooks' state

    def before(step: int, kwargs: dict) -> None:
        # DiTTransformer2DModel has no CacheMixin (no enable_cache/cache_context): what a
        # diffusers pipeline would do around the denoiser call is done here by hand.
        now["step"] = step
        if step == 0:
            computed.clear()
            HookRegistry.check_if_exists_or_initialize(m).reset_stateful_hooks(recurse=True)
        t = kwargs.get("timestep")
        now["t"] = int(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else int(t or 0)
        _set_cache_context(m, CacheContext("cond", step_index=step, num_inference_steps=num_steps, timestep=now["t"]))

    def after() -> None:
        if leader_hook is not None:  # read outside any compiled region, before the context is cleared
            hook = HookRegistry.check_if_exists_or_initialize(m.transformer_blocks[0]).get_hook(leader_hook)
            if hook.state_manager.get_state().should_compute:
                computed.append(now["step"])
        _set_cache_context(m, None)

    mixin = "has CacheMixin" if hasattr(model, "enable_cache") else "no CacheMixin: hooks applied with diffusers.hooks.apply_* and the cache context set by hand"
    return PeerModel(
        name, m, num_steps, label=f"diffusers {version} {label}", step_kinds=step_kinds,
        before_call=before, after_call=after, notes=[mixin, *notes],
        info=(lambda: {"computed_steps": sorted(set(computed))}) if leader_hook is not None else None,
    )


def _build_fbc(model: torch.nn.Module, *, num_steps: int, settings: dict | None = None, **_: Any) -> PeerModel:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    threshold = 0.05 if settings is None else settings["threshold"]
    return _diffusers_peer(
        "fbc", model, num_steps, lambda m, t: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold)),
        label=f"first-block cache (threshold {threshold:g})", step_kinds=None, leader_hook="fbc_leader_block_hook",
        notes=["skip decision per step from a .item() on the first block's residual: graph breaks under torch.compile"],
    )


def _build_taylorseer(model: torch.nn.Module, *, num_steps: int, interval: int, **_: Any) -> PeerModel:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    # Warm-up of interval-1 steps puts its full steps at 0, 1 (for the first derivative), then
    # interval, 2·interval ... : FORA's full steps plus step 1.
    before = max(1, interval - 1)
    cfg = TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=before, max_order=1, taylor_factors_dtype=torch.float32,
        # Its default patterns ("^transformer_blocks.*attn", matched with re.fullmatch) miss
        # DiT's "attn1": name the modules FORA caches.
        cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"],
    )
    kinds = [
        "full" if s < before or (s - before - 1) % interval == 0 else "forecast" for s in range(num_steps)
    ]
    return _diffusers_peer(
        "taylorseer", model, num_steps, lambda m, t: apply_taylorseer_cache(m, cfg),
        label=f"TaylorSeer order 1 (interval {interval})", step_kinds=kinds,
        notes=["its default module patterns do not match DiT's attn1 (fullmatch): identifiers given explicitly"],
    )


def _build_pab(model: torch.nn.Module, *, num_steps: int, interval: int, **_: Any) -> PeerModel:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def apply(m: torch.nn.Module, timestep: Callable[[], int]) -> None:
        apply_pyramid_attention_broadcast(
            m,
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=interval,
                # every timestep (0..999) is inside the range, so its pattern is FORA's on attention
                spatial_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=timestep,
            ),
        )

    return _diffusers_peer(
        "pab", model, num_steps, apply, label=f"pyramid attention broadcast (attention only, interval {interval})",
        step_kinds=_fora_kinds(num_steps, interval, "attn reused"),
        notes=["reuses attention only (diffusers' PAB has no MLP reuse)"],
    )


def _build_magcache(
    model: torch.nn.Module, *, num_steps: int, calibrate: Callable[[torch.nn.Module], None], settings: dict | None = None, **_: Any
) -> PeerModel:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    if settings is not None and settings.get("ratios") is not None:  # a magcache schedule's own ratios and settings
        ratios, threshold, k, retention = settings["ratios"], settings["threshold"], settings["max_skip_steps"], settings["retention_ratio"]
    else:
        ratios, threshold, k, retention = _magcache_ratios(model, num_steps, calibrate), 0.06, 3, 0.2
    cfg = MagCacheConfig(mag_ratios=list(ratios), num_inference_steps=num_steps, threshold=threshold, max_skip_steps=k,
                         retention_ratio=retention)
    return _diffusers_peer(
        "magcache", model, num_steps, lambda m, t: apply_mag_cache(m, cfg),
        label=f"MagCache (threshold {threshold:g}, K={k})", step_kinds=None, leader_hook="mag_cache_leader_block_hook",
        notes=["needs per-model magnitude ratios: calibrated here by one uncached run (calibrate=True)",
               "skip decision is Python (torch.compiler.disable on every block hook): graph breaks under torch.compile"],
    )


def _magcache_ratios(model: torch.nn.Module, num_steps: int, calibrate: Callable[[torch.nn.Module], None]) -> list[float]:
    """Run MagCache's own calibration mode once and read the ratios it prints."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    peer = _diffusers_peer(
        "magcache-calibration", model, num_steps,
        lambda m, t: apply_mag_cache(m, MagCacheConfig(calibrate=True, num_inference_steps=num_steps)),
        label="MagCache calibration", step_kinds=None, notes=[],
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        calibrate(peer)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("[") and ln.rstrip().endswith("]")]
    if not lines:
        raise PeerUnavailable("MagCache calibration printed no ratios (its calibration output format changed)")
    ratios = ast.literal_eval(lines[-1].strip())
    if len(ratios) != num_steps:
        raise PeerUnavailable(f"MagCache calibration gave {len(ratios)} ratios for {num_steps} steps")
    return [float(r) for r in ratios]


PEERS: dict[str, PeerSpec] = {
    "cache-dit": PeerSpec("cache-dit", "cache-dit", "cache-dit DBCache, dynamic residual threshold", False, _build_cache_dit),
    "cache-dit-mask": PeerSpec("cache-dit-mask", "cache-dit", "cache-dit DBCache, static mask = our full steps", True, _build_cache_dit_mask),
    "fbc": PeerSpec("fbc", "diffusers", "diffusers first-block cache", False, _build_fbc),
    "taylorseer": PeerSpec("taylorseer", "diffusers", "diffusers TaylorSeer", True, _build_taylorseer),
    "magcache": PeerSpec("magcache", "diffusers", "diffusers MagCache", False, _build_magcache),
    "pab": PeerSpec("pab", "diffusers", "diffusers pyramid attention broadcast", True, _build_pab),
}


def matches_schedule(name: str, schedule: Any) -> bool:
    """Whether peer ``name`` runs the policy of ``schedule`` when given its params as ``settings``:
    cache-dit any ``dbcache``; diffusers' FBC a First-Block-Cache ``dbcache`` (one block first,
    none last, no warm-up, no limits); diffusers' MagCache a ``magcache``."""
    p = schedule.params
    if name == "cache-dit":
        return schedule.method == "dbcache"
    if name == "fbc":
        return schedule.method == "dbcache" and (p["compute_first"], p["compute_last"], p["warmup_steps"]) == (1, 0, 0) and \
            p["max_cached_steps"] is None and p["max_continuous_cached_steps"] is None
    if name == "magcache":
        return schedule.method == "magcache"
    return False


def peer_names() -> list[str]:
    return list(PEERS)


def build_peer(
    name: str,
    model: torch.nn.Module,
    *,
    num_steps: int,
    interval: int | None = None,
    mask: list[int] | None = None,
    calibrate: Callable[[torch.nn.Module], None] | None = None,
    settings: dict | None = None,
) -> PeerModel:
    """A fresh peer on a deep copy of ``model`` (the model itself is never modified).

    ``interval`` configures the peers that follow a schedule (``PEERS[name].uses_interval``);
    ``mask`` (1 = full step) sets cache-dit's static ``steps_computation_mask`` directly;
    ``calibrate(peer)`` runs one sampling run (MagCache calibrates with it); ``settings`` (a
    dynamic schedule's params) configures the dynamic peers with that schedule's settings:
    ``cache-dit`` and ``fbc`` from a ``dbcache`` schedule, ``magcache`` from a ``magcache`` one.
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known peers: {', '.join(PEERS)}")
    spec = PEERS[name]
    if spec.uses_interval and not interval and mask is None:
        raise ValueError(f"peer {name!r} follows a schedule: pass interval= (or mask= for cache-dit-mask)")
    if name == "magcache" and calibrate is None and (settings is None or settings.get("ratios") is None):
        raise ValueError("peer 'magcache' needs calibrate=fn(peer) that runs one sampling run, or settings with ratios")
    return spec.build(model, num_steps=num_steps, interval=interval, mask=mask, calibrate=calibrate, settings=settings)


def probe_export(peer: PeerModel, example_kwargs: dict) -> str:
    """Try ``torch.export`` (non-strict, as cachecompile captures) on the hooked model.

    Returns a one-line verdict. An export that succeeds still holds only the branch traced at
    this step: the peer's cache and its decisions stay in Python, outside the exported program.
    """
    step = peer.calls % peer.num_steps
    if peer._before is not None:
        peer._before(step, example_kwargs)
    try:
        ep = torch.export.export(peer.model, (), dict(example_kwargs), strict=False)
    except Exception as e:  # noqa: BLE001 - any failure is the verdict
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"torch.export failed: {type(e).__name__}: {first}"
    finally:
        if peer._after is not None:
            peer._after()
    n_in = len(ep.graph_signature.user_inputs)
    return (
        f"torch.export traced one step ({n_in} inputs, no cache inputs/outputs): the cache and the "
        f"skip decisions stay in Python hooks, so no exported artifact (AOTInductor/ONNX) can replay the schedule"
    )
