"""Train the digits DiT and the digits classifier shipped in ``cachecompile/models/weights``.

Usage::

    python -m cachecompile.tools.zoo.train_digits --out DIR --seed 0 --steps 2000   # the shipped weights
    python -m cachecompile.tools.zoo.train_digits --out DIR --seed 0 --minutes 28   # = fixed step count

The run is defined by its step count, never by wall time: ``--minutes`` is converted to steps
with the fixed rate ``SECONDS_PER_STEP`` measured on the project machine, so the same command
gives the same weights (single thread, seeded init, seeded data order/noise/timesteps).

Writes ``digits_dit.safetensors`` (EMA weights, float16), ``digits_classifier.safetensors``
(float16), ``digits_config.json``, plus ``digits_dit_raw.safetensors`` (non-EMA, float32, not
shipped) and ``train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn

from cachecompile.models import digits as D

# Measured with --probe 20 on the project machine (0.986 s/step; 2 shared cores,
# torch.set_num_threads(1), DiT batch 128): used only to turn --minutes into a fixed step count.
SECONDS_PER_STEP = 1.0


# ----------------------------------------------------------------------------- classifier


def _gaussian_blur(x: torch.Tensor, sigma: float = 0.8) -> torch.Tensor:
    r = torch.arange(-1, 2, dtype=x.dtype)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k[None, None])


def augment_digits(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random small affine warp, blur, contrast change and noise, so the classifier also
    recognises imperfect generated digits. Deterministic given ``g``."""
    b = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g)  # noqa: E731
    ang, s = u(-0.2, 0.2), u(0.9, 1.1)
    tx, ty = u(-0.15, 0.15), u(-0.15, 0.15)
    theta = torch.stack(
        [torch.stack([s * torch.cos(ang), -s * torch.sin(ang), tx], 1),
         torch.stack([s * torch.sin(ang), s * torch.cos(ang), ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0; shift so that 0 is the background (-1).
    x = F.grid_sample(x + 1.0, grid, align_corners=False) - 1.0
    alpha = u(0.0, 1.0)[:, None, None, None] * (torch.rand(b, 1, 1, 1, generator=g) < 0.5)
    x = (1 - alpha) * x + alpha * _gaussian_blur(x)
    x = (x + 1.0) * u(0.7, 1.1)[:, None, None, None] - 1.0
    x = x + u(0.0, 0.3)[:, None, None, None] * torch.randn(x.shape, generator=g)
    return x.clamp(-1.0, 1.0)


def train_classifier(seed: int, epochs: int = 40, batch: int = 64, lr: float = 2e-3) -> tuple[nn.Module, dict]:
    """Train :class:`DigitsClassifier` on the train split; report held-out accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = D.load_digits_images("train")
    xt, yt = D.load_digits_images("test")
    clf = D.DigitsClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(clf(augment_digits(x[idx], g)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(xt).argmax(1) == yt).float().mean().item()
        acc_aug = (clf(augment_digits(xt, torch.Generator().manual_seed(123))).argmax(1) == yt).float().mean().item()
    rec = dict(epochs=epochs, batch=batch, lr=lr, seconds=round(time.time() - t0, 1),
               test_accuracy=round(acc, 4), test_accuracy_augmented=round(acc_aug, 4))
    return clf, rec


# ----------------------------------------------------------------------------- DiT


def _alphas_cumprod() -> torch.Tensor:
    c = D.DIGITS_CONFIG
    betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, 0)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))  # cosine down to 10 %


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, step: int, max_decay: float) -> None:
    decay = min(max_decay, (1 + step) / (10 + step))  # short run: warm the EMA up
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


class TimestepLossNormalizer:
    """Weights each sample by the running mean of the loss in its timestep bin, raised to
    ``-power`` (``power=1``: every bin carries the same relative loss; ``0``: plain MSE).

    Why: with a uniform epsilon loss the high-noise steps (MSE ~5e-4) carry almost no weight
    next to the low-noise ones (~0.2-0.6), but their small epsilon errors are amplified by
    1/sqrt(alpha_bar) into the predicted x0. DDIM with diffusers' default clip_sample=True then
    clips that x0 without re-deriving epsilon, which corrupts the few-percent signal present at
    high noise, more so the more steps are taken (measured: 0.98 / 0.72 / 0.27 accuracy at
    25 / 50 / 100 DDIM steps with uniform weighting). Equalising the relative loss across bins
    (like EDM's learned per-noise-level weighting) fixes the cause instead of the sampler.
    Fully equalised (power 1) the low-noise bins starve instead: x0 error at t=50 is 2.6x
    that of plain MSE and samples stay grainy; the default power 0.5 sits between the two.
    """

    def __init__(self, num_timesteps: int, bins: int = 20, decay: float = 0.98, power: float = 0.5) -> None:
        self.num_timesteps, self.bins, self.decay, self.power = num_timesteps, bins, decay, power
        self.ema = torch.ones(bins)

    def weights(self, t: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
        """Update the bin means with this batch, return weights with batch mean 1."""
        b = t * self.bins // self.num_timesteps
        with torch.no_grad():
            for k in b.unique().tolist():
                self.ema[k] = self.decay * self.ema[k] + (1 - self.decay) * per_sample[b == k].mean()
        w = self.ema[b] ** -self.power
        return w / w.mean()


def dit_loss(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, g: torch.Generator,
             acp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample epsilon-prediction DDPM loss ``[B]`` and the timesteps ``[B]``, with label
    dropout to the null class (CFG training)."""
    c = D.DIGITS_CONFIG
    b = x0.shape[0]
    t = torch.randint(0, c.num_train_timesteps, (b,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(b, generator=g) < c.class_dropout_prob
    y = torch.where(drop, torch.full_like(y, c.null_class), y)
    a = acp[t].view(b, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps = model(xt, timestep=t, class_labels=y).sample
    return ((eps - noise) ** 2).flatten(1).mean(1), t


def zero_init(model: nn.Module) -> None:
    """adaLN-Zero initialisation of the DiT paper, which diffusers does not apply: every
    block's modulation (shift/scale/gate) and the output head start at zero, so each block
    starts as the identity and the model as eps = 0."""
    for block in model.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def train_dit(seed: int, steps: int, out: Path, batch: int = 128, lr: float = 5e-4,
              warmup: int = 100, ema_decay: float = 0.999, log_every: int = 25,
              ckpt_every: int = 400, weight_power: float = 0.5) -> tuple[nn.Module, nn.Module, dict]:
    """Train the DiT for a fixed number of steps; return (ema model, raw model, record)."""
    torch.manual_seed(seed)
    model = D.build_dit()
    zero_init(model)
    # Train in eval mode: the only train-mode behaviour of this model is diffusers' own label
    # dropout, which draws an independent mask in each of the 7 LabelEmbedding calls per forward
    # (and from the global RNG). We drop labels once per sample ourselves, from a seeded generator.
    model.eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 2)
    x, y = D.load_digits_images("all")
    acp = _alphas_cumprod()
    norm = TimestepLossNormalizer(D.DIGITS_CONFIG.num_train_timesteps, power=weight_power)
    perm, pos = torch.randperm(len(y), generator=g), 0
    log = (out / "train_log.jsonl").open("w")
    t0, run_loss = time.time(), None
    for step in range(steps):
        if pos + batch > len(y):  # new epoch, fixed seeded order
            perm, pos = torch.randperm(len(y), generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        per_sample, t = dit_loss(model, x[idx], y[idx], g, acp)
        loss = (per_sample * norm.weights(t, per_sample.detach())).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, step, ema_decay)
        # Log the unweighted MSE so that runs with and without weighting compare.
        mse = per_sample.mean().item()
        run_loss = mse if run_loss is None else 0.98 * run_loss + 0.02 * mse
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec = dict(step=step + 1, mse=round(mse, 5), mse_smoothed=round(run_loss, 5),
                       weighted_loss=round(loss.item(), 5), lr=opt.param_groups[0]["lr"],
                       elapsed=round(time.time() - t0, 1),
                       bin_mse=[float(f"{v:.3g}") for v in norm.ema[::4].tolist()])
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if (step + 1) % ckpt_every == 0:
            _save(ema, out / f"digits_dit_ckpt{step + 1}.safetensors")
    elapsed = time.time() - t0
    rec = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, lr_schedule="linear warmup, cosine to 10%",
               ema_decay=ema_decay, weight_decay=0.01, grad_clip=1.0, optimizer="AdamW",
               final_mse_smoothed=round(run_loss, 5), init="adaLN-Zero (zero_init)",
               loss_weighting=f"running mean MSE per timestep bin ** -{weight_power} (20 bins, decay 0.98)",
               final_bin_mse=[float(f"{v:.3g}") for v in norm.ema.tolist()], seconds=round(elapsed, 1),
               seconds_per_step=round(elapsed / steps, 3), augmentation="none")
    return ema, model, rec


def _save(model: nn.Module, path: Path, half: bool = True) -> None:
    from safetensors.torch import save_file

    sd = {k: (v.half() if half else v).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="DiT optimizer steps (defines the run)")
    p.add_argument("--minutes", type=float, default=28.0,
                   help=f"converted to steps at a fixed {SECONDS_PER_STEP} s/step when --steps is absent")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-power", type=float, default=0.5,
                   help="per-timestep-bin loss weight = (running bin MSE) ** -power; 0 = plain MSE")
    p.add_argument("--probe", type=int, default=0, help="only time this many DiT steps, write nothing")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.probe:
        _, _, rec = train_dit(a.seed, a.probe, a.out, batch=a.batch, lr=a.lr, ckpt_every=10**9)
        print(json.dumps(rec))
        return
    steps = a.steps or int(round(a.minutes * 60 / SECONDS_PER_STEP))
    clf, clf_rec = train_classifier(a.seed)
    print(json.dumps({"classifier": clf_rec}), flush=True)
    _save(clf, a.out / D.CLASSIFIER_WEIGHTS)
    ema, raw, dit_rec = train_dit(a.seed, steps, a.out, batch=a.batch, lr=a.lr, weight_power=a.weight_power)
    _save(ema, a.out / D.DIT_WEIGHTS)
    _save(raw, a.out / "digits_dit_raw.safetensors", half=False)
    cfg = dict(
        digits=D.config_dict(),
        dit=D.dit_config(),
        classifier=dict(width=clf.width, feature_dim=clf.feature_dim, num_classes=clf.num_classes),
        training=dict(seed=a.seed, command=f"python -m cachecompile.tools.zoo.train_digits --out DIR --seed {a.seed} --steps {steps}"
                      f" --weight-power {a.weight_power}",
                      torch=torch.__version__, threads=1, dit=dit_rec, classifier=clf_rec,
                      weights_dtype="float16 (loaded as float32)", dit_weights="EMA"),
    )
    (a.out / D.CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    print(json.dumps(cfg["training"]), flush=True)


if __name__ == "__main__":
    main()
