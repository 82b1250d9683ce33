"""An independent eager reference of ToCa / DuCa for the tests, written from the methods' definitions and the
DuCa / ToCa papers' code (not from cachecompile's passes): hand-edited copies of a diffusers DiT
whose attention, MLP and block calls cache, reuse and partially recompute in plain PyTorch."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F


def step_kind(method: str, step: int, interval: int) -> str:
    r = step % interval
    if r == 0:
        return "full"
    if method == "toca" or r % 2 == 1:
        return "conservative"
    return "aggressive"


class _State:
    def __init__(self, method: str, interval: int, num_blocks: int) -> None:
        self.method, self.interval, self.num_blocks = method, interval, num_blocks
        self.calls = 0
        self.stack_in = self.stack_out = None

    @property
    def kind(self) -> str:
        return step_kind(self.method, self.calls, self.interval)


class _Attn(torch.nn.Module):
    """Computes at full steps (recording per-head value norms and received attention), reused otherwise."""

    def __init__(self, attn: torch.nn.Module, state: _State) -> None:
        super().__init__()
        self.attn, self.state = attn, state
        self.out = self.v_norm = self.received = None
        self._v = self._q = self._k = None
        attn.to_v.register_forward_hook(lambda m, i, o: setattr(self, "_v", o))
        attn.to_q.register_forward_hook(lambda m, i, o: setattr(self, "_q", o))
        attn.to_k.register_forward_hook(lambda m, i, o: setattr(self, "_k", o))

    def forward(self, hidden_states, **kw):
        if self.state.kind == "full" or self.out is None:
            self.out = self.attn(hidden_states, **kw)
            b, n, _ = self._v.shape
            h = self.attn.heads
            split = lambda t: t.view(b, n, h, -1).transpose(1, 2)  # noqa: E731  [B, H, N, d]
            self.v_norm = split(self._v).norm(dim=-1)  # [B, H, N], as DuCa's Attention.forward
            q, k = split(self._q), split(self._k)
            probs = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            self.received = probs.mean(dim=1).sum(dim=1)  # [B, N], as ToCa's attn map
        return self.out


class _Mlp(torch.nn.Module):
    """Computes at full steps; at conservative steps recomputes the top-k tokens by the score."""

    def __init__(self, ff: torch.nn.Module, attn: _Attn, state: _State, ratio: float, score: dict) -> None:
        super().__init__()
        self.ff, self.attn, self.state, self.ratio, self.score = ff, attn, state, ratio, score
        self.cache = self.stamp = None

    def forward(self, x):
        step = self.state.calls
        if self.state.kind == "full" or self.cache is None:
            self.cache = self.ff(x)
            self.stamp = torch.full(x.shape[:2], float(step))
            return self.cache
        n = x.shape[1]
        k = int(math.floor(self.ratio * n + 0.5))
        if k == 0:
            return self.cache
        score = torch.zeros(x.shape[:2])
        for name, w in self.score.items():
            if name == "v_norm":  # DuCa kv_norm_score: normalize((1 - v_norm).sum(heads))
                score = score + w * F.normalize((1 - self.attn.v_norm).sum(dim=-2), p=2, dim=1)
            elif name == "attention":  # ToCa attn_score
                score = score + w * F.normalize(self.attn.received, p=2, dim=1)
            elif name == "staleness":
                score = score + w * (step - self.stamp)
            else:
                raise ValueError(name)
        fresh = score.argsort(dim=-1, descending=True)[:, :k]  # [B, k]
        rows = torch.stack([x[b, fresh[b]] for b in range(x.shape[0])])
        out = self.ff(rows)
        cache = self.cache.clone()
        stamp = self.stamp.clone()
        for b in range(x.shape[0]):
            cache[b, fresh[b]] = out[b]
            stamp[b, fresh[b]] = float(step)
        self.cache, self.stamp = cache, stamp
        return cache


class _Block(torch.nn.Module):
    """Runs the block, except at aggressive steps: block 0 returns the reused stack, the rest pass through."""

    def __init__(self, block: torch.nn.Module, index: int, state: _State, mode: str) -> None:
        super().__init__()
        self.block, self.index, self.state, self.mode = block, index, state, mode
        self.norm1 = block.norm1  # the DiT output head reads transformer_blocks[0].norm1.emb

    def forward(self, hidden_states, **kw):
        s = self.state
        if s.kind == "aggressive":
            if self.index > 0:
                return hidden_states
            if self.mode == "output":
                return s.stack_out
            return hidden_states + (s.stack_out - s.stack_in)
        if self.index == 0:
            s.stack_in = hidden_states
        out = self.block(hidden_states, **kw)
        if self.index == s.num_blocks - 1:
            s.stack_out = out
        return out


class DualReference(torch.nn.Module):
    """``method`` ``"toca"`` or ``"duca"``; ``score`` a dict name → weight (not ``random``)."""

    def __init__(self, model, method: str, interval: int, ratio: float, score: dict | None = None, mode: str = "output") -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        blocks = self.model.transformer_blocks
        self.state = _State(method, interval, len(blocks))
        for i, block in enumerate(blocks):
            attn = _Attn(block.attn1, self.state)
            block.attn1 = attn
            block.ff = _Mlp(block.ff, attn, self.state, ratio, score or {"v_norm": 1.0})
            blocks[i] = _Block(block, i, self.state, mode)

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.state.calls += 1
        return out

    def restart(self) -> None:
        self.state.calls = 0
