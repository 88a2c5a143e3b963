"""Training a latent degradation operator H for one degradation A and one VAE encoder E.

H(E(x̃), σ) is fitted to E(lift(A(x̃) + n)), n ~ N(0, σ²), both latents clamped to [−4, 4] as in the paper, with
x̃ random augmented crops of the training images. Pure torch: ``encode`` is any callable image→latent in the
sampler's latent space (ComfyUI's ``process_in`` space, i.e. scaled latents), so the same function serves the
ComfyUI node, the command line and plain Python.

Determinism and resuming: every random draw of step k comes from a generator seeded with (seed, k), so a run
resumed from a :class:`TrainState` saved at step k continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .degradations import Degradation, build_degradation
from .network import LatentOperator, mask_to_latent

LATENT_CLAMP = 4.0
_STATE_FORMAT = "comfyui-silo.train-state"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 50
    loss: str = "l1"  # "l1" | "l2"
    crop_size: int = 256
    crop_scale: tuple[float, float] = (0.75, 1.0)
    hflip: bool = True
    vflip: bool = True
    color_jitter: float = 0.05
    sigma_range: tuple[float, float] = (0.0, 0.05)
    ema_decay: float | None = None
    eval_every: int = 100
    heldout_fraction: float = 0.1
    heldout_sigma: float = 0.01
    grad_clip: float | None = 1.0
    seed: int = 0
    # Latent cache: encode this many augmented (input, target) pairs once and train on minibatches drawn from them.
    # Much faster with slow encoders (a VAE on a CPU), at the price of less augmentation. None: fresh pairs each step.
    pool_size: int | None = None

    def validate(self) -> None:
        def bad(field_name, expected, value):
            raise ValueError(f"training option '{field_name}' must be {expected}, got {value!r}")

        if self.steps < 1:
            bad("steps", "at least 1", self.steps)
        if self.batch_size < 1:
            bad("batch_size", "at least 1", self.batch_size)
        if not self.lr > 0:
            bad("lr", "a positive number", self.lr)
        if self.lr_schedule not in ("cosine", "constant"):
            bad("lr_schedule", "'cosine' or 'constant'", self.lr_schedule)
        if self.loss not in ("l1", "l2"):
            bad("loss", "'l1' or 'l2'", self.loss)
        if self.crop_size < 16 or self.crop_size % 8:
            bad("crop_size", "a multiple of 8 of at least 16 pixels", self.crop_size)
        lo, hi = self.sigma_range
        if not 0 <= lo <= hi:
            bad("sigma_range", "(low, high) with 0 <= low <= high", self.sigma_range)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            bad("ema_decay", "None or a number in (0, 1)", self.ema_decay)
        if not 0 <= self.heldout_fraction < 1:
            bad("heldout_fraction", "in [0, 1)", self.heldout_fraction)
        if self.pool_size is not None and self.pool_size < self.batch_size:
            bad("pool_size", "None or at least batch_size", self.pool_size)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["crop_scale"] = list(self.crop_scale)
        d["sigma_range"] = list(self.sigma_range)
        return d


@dataclass
class TrainResult:
    operator: LatentOperator
    report: dict
    state: TrainState | None = None


@dataclass
class TrainState:
    """Everything needed to resume: operator (and EMA) weights, optimiser moments, the step reached, the config."""

    step: int
    operator: dict
    ema: dict | None
    optimizer: dict
    config: dict
    curve: list = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        tensors = {f"op.{k}": v.detach().contiguous().cpu() for k, v in self.operator.items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in self.ema.items()})
        opt_meta = {"param_groups": self.optimizer["param_groups"], "state_keys": {}}
        for idx, st in self.optimizer["state"].items():
            keys = []
            for k, v in st.items():
                t = v if torch.is_tensor(v) else torch.tensor(v)
                tensors[f"opt.{idx}.{k}"] = t.detach().contiguous().cpu()
                keys.append(k)
            opt_meta["state_keys"][str(idx)] = keys
        meta = {"format": _STATE_FORMAT, "step": str(self.step), "config": json.dumps(self.config),
                "optimizer": json.dumps(opt_meta), "curve": json.dumps(self.curve)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> TrainState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"{Path(path).name} is not a comfyui-silo training state (resume files are written by "
                             "train_operator(..., state_path=...))")
        tensors = load_file(str(path))
        opt_meta = json.loads(meta["optimizer"])
        state = {}
        for idx, keys in opt_meta["state_keys"].items():
            state[int(idx)] = {k: tensors[f"opt.{idx}.{k}"] for k in keys}
        return cls(
            step=int(meta["step"]),
            operator={k[3:]: v for k, v in tensors.items() if k.startswith("op.")},
            ema={k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None,
            optimizer={"state": state, "param_groups": opt_meta["param_groups"]},
            config=json.loads(meta["config"]),
            curve=json.loads(meta.get("curve", "[]")),
        )


# ----------------------------------------------------------------------------------------------- data

def _as_image_list(images) -> list[torch.Tensor]:
    if torch.is_tensor(images):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N,3,H,W] (values 0-1), got shape {tuple(images.shape)}")
        return [im for im in images]
    out = []
    for i, im in enumerate(images):
        if im.ndim == 4 and im.shape[0] == 1:
            im = im[0]
        if im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"image {i} must be [3,H,W] (values 0-1), got shape {tuple(im.shape)}")
        out.append(im)
    if not out:
        raise ValueError("no training images were given")
    return out


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_crop(image: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Random resized crop: a square window covering ``scale`` of the shorter side, resized to ``size``."""
    _, h, w = image.shape
    side = max(8, int(round(min(h, w) * math.sqrt(_uniform(g, *scale)))))
    top = int(torch.randint(0, h - side + 1, (), generator=g))
    left = int(torch.randint(0, w - side + 1, (), generator=g))
    crop = image[:, top:top + side, left:left + side][None]
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False,
                             antialias=side > size).clamp(0, 1)
    return crop[0]


def augment(crop: torch.Tensor, cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    if cfg.hflip and float(torch.rand((), generator=g)) < 0.5:
        crop = crop.flip(-1)
    if cfg.vflip and float(torch.rand((), generator=g)) < 0.5:
        crop = crop.flip(-2)
    j = cfg.color_jitter
    if j > 0:
        brightness = _uniform(g, 1 - j, 1 + j)
        contrast = _uniform(g, 1 - j, 1 + j)
        saturation = _uniform(g, 1 - j, 1 + j)
        crop = crop * brightness
        mean = crop.mean()
        crop = (crop - mean) * contrast + mean
        grey = crop.mean(0, keepdim=True)
        crop = (crop - grey) * saturation + grey
    return crop.clamp(0, 1)


def center_crops(images: Sequence[torch.Tensor], size: int, per_image: int = 1, area: float = 1.0) -> torch.Tensor:
    """Deterministic held-out crops resized to ``size``: a centred square covering ``area`` of the shorter side's
    square, and with ``per_image`` up to 5 also the four corner squares of that size."""
    out = []
    for im in images:
        _, h, w = im.shape
        side = max(8, int(min(h, w) * math.sqrt(area)))
        windows = [((h - side) // 2, (w - side) // 2, side)]
        if per_image > 1:
            s = side
            windows += [(0, 0, s), (0, w - s, s), (h - s, 0, s), (h - s, w - s, s)][: per_image - 1]
        for top, left, sd in windows:
            crop = im[:, top:top + sd, left:left + sd][None]
            if sd != size:
                crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False,
                                     antialias=sd > size).clamp(0, 1)
            out.append(crop[0])
    return torch.stack(out)


def _training_degradation(degradation: Degradation, batch: int, size: int, g: torch.Generator) -> Degradation:
    """For user-drawn masks (mask_inpaint) train on random rectangles, so the operator generalises to any mask."""
    if degradation.spec["type"] != "mask_inpaint":
        return degradation
    mask = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            hh = int(size * _uniform(g, 0.15, 0.6))
            ww = int(size * _uniform(g, 0.15, 0.6))
            top = int(torch.randint(0, size - hh + 1, (), generator=g))
            left = int(torch.randint(0, size - ww + 1, (), generator=g))
            mask[b, :, top:top + hh, left:left + ww] = 1
    return build_degradation({"type": "mask_inpaint"}, mask=mask)


def make_pairs(encode: Callable[[torch.Tensor], torch.Tensor], degradation: Degradation, x: torch.Tensor,
               sigma: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(E(x), E(lift(A(x)+n)), latent mask) for a batch of clean crops ``x``; latents clamped to [−4, 4]."""
    with torch.no_grad():
        y = degradation(x)
        noise = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device) * sigma.view(-1, 1, 1, 1).to(y)
        y = (y + noise).clamp(0, 1)
        lifted = degradation.lift(y, size=tuple(x.shape[-2:]))
        both = encode(torch.cat([x, lifted])).to(x.device).float().clamp(-LATENT_CLAMP, LATENT_CLAMP)
        z_in, target = both[: x.shape[0]], both[x.shape[0]:]
        pm = degradation.pixel_mask(x.shape, device=x.device)
        mask = None if pm is None else mask_to_latent(pm, z_in.shape[-2:])
    return z_in, target, mask


# ------------------------------------------------------------------------------------------ metrics

def _metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    err = (pred - target).float()
    return {"l1": float(err.abs().mean()), "mse": float(err.pow(2).mean()),
            "rel_l2": float(err.flatten(1).norm(dim=1).mean() / target.flatten(1).norm(dim=1).mean().clamp_min(1e-12))}


def evaluate(operator, degradation: Degradation, heldout: dict) -> dict:
    """Held-out fidelity of the operator next to the two trivial baselines (identity, degradation on the latent)."""
    z, t, sigma, mask = heldout["z"], heldout["target"], heldout["sigma"], heldout["mask"]
    with torch.no_grad():
        pred = operator(z, sigma_y=sigma, mask=mask)
        naive = degradation.naive_latent(z, mask=mask)
    return {"operator": _metrics(pred, t), "identity": _metrics(z, t), "naive_latent": _metrics(naive, t)}


def prepare_heldout(encode, degradation: Degradation, images: Sequence[torch.Tensor], size: int, sigma: float,
                    seed: int, area: float = 1.0) -> dict:
    """Held-out pairs from 5 fixed crops per image, at the mean scale of the training crops."""
    x = center_crops(images, size, per_image=5, area=area)
    g = torch.Generator().manual_seed(seed + 7919)
    deg = _training_degradation(degradation, x.shape[0], size, g).to(x.device)
    sig = torch.full((x.shape[0],), float(sigma), device=x.device)
    z, target, mask = make_pairs(encode, deg, x, sig, g)
    return {"z": z, "target": target, "sigma": sig, "mask": mask, "degradation": deg}


# ------------------------------------------------------------------------------------------ training

def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_operator(
    encode: Callable[[torch.Tensor], torch.Tensor],
    degradation: Degradation | dict,
    images,
    *,
    config: TrainConfig | None = None,
    operator: LatentOperator | None = None,
    operator_config: dict | None = None,
    heldout_images=None,
    resume: TrainState | str | Path | None = None,
    state_path: str | Path | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], None] | None = None,
    device: str | torch.device = "cpu",
    **overrides,
) -> TrainResult:
    """Fit a :class:`LatentOperator` so that H(E(x̃), σ) ≈ E(lift(A(x̃)+n)).

    Args:
        encode: image [B,3,H,W] in [0,1] → latent [B,C,H/8,W/8] in the sampler's (scaled) latent space.
        degradation: a :class:`Degradation` or its spec.
        images: [N,3,H,W] tensor or a list of [3,H,W] tensors (sizes may differ), values in [0,1].
        config / overrides: :class:`TrainConfig` fields (``steps=500, batch_size=4`` ...).
        operator: start from this operator (default: a fresh identity operator; masks if the degradation has one).
        operator_config: :class:`LatentOperator` arguments for the fresh operator (initialised from ``seed``).
        heldout_images: images for the held-out evaluation; default: ``heldout_fraction`` of ``images``.
        resume: a :class:`TrainState` (or its file) to continue from.
        state_path: where to save a resumable state at every evaluation and at the end.
        progress: called as ``progress(step, total, info)`` after every step.
        should_stop: called every step; raise from it to abort (ComfyUI's interrupt).
    Returns:
        :class:`TrainResult` with the operator (EMA weights when EMA is on), a JSON-able report and the final state.
    """
    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown training option '{k}'")
        setattr(cfg, k, v)
    if isinstance(resume, (str, Path)):
        resume = TrainState.load(resume)
    if resume is not None:
        for k, v in resume.config.items():
            if k not in ("steps", "eval_every"):
                setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
    cfg.validate()
    if isinstance(degradation, dict):
        degradation = build_degradation(degradation)

    imgs = _as_image_list(images)
    if heldout_images is None:
        n_held = int(round(len(imgs) * cfg.heldout_fraction))
        if cfg.heldout_fraction > 0 and len(imgs) >= 2:
            n_held = max(1, n_held)
        held, imgs = imgs[len(imgs) - n_held:], imgs[: len(imgs) - n_held]
    else:
        held = _as_image_list(heldout_images)
    if not imgs:
        raise ValueError("no training images left after holding some out; give more images or heldout_fraction=0")
    small = [tuple(im.shape[-2:]) for im in imgs if min(im.shape[-2:]) < cfg.crop_size * cfg.crop_scale[0] ** 0.5 / 2]
    if small:
        raise ValueError(f"training images of size {small[0]} are too small for crop_size {cfg.crop_size}; "
                         "use larger images or a smaller crop_size")

    device = torch.device(device)
    use_mask = degradation.spec["type"] in ("box_inpaint", "random_box_inpaint", "mask_inpaint")
    if operator is None:
        probe = encode(torch.zeros(1, 3, cfg.crop_size, cfg.crop_size, device=device))
        kwargs = {"latent_channels": probe.shape[1], "use_mask": use_mask, **(operator_config or {})}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            operator = LatentOperator(**kwargs)
    elif operator_config:
        raise ValueError("pass either operator or operator_config, not both")
    operator = operator.to(device).float().train()
    ema = copy.deepcopy(operator).eval() if cfg.ema_decay else None
    if ema is not None:
        for p in ema.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(operator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, curve = 0, []
    if resume is not None:
        operator.load_state_dict(resume.operator)
        if ema is not None and resume.ema is not None:
            ema.load_state_dict(resume.ema)
        opt.load_state_dict(resume.optimizer)
        start, curve = resume.step, list(resume.curve)

    heldout = None
    if held:
        heldout = prepare_heldout(encode, degradation.to(device), [im.to(device) for im in held], cfg.crop_size,
                                  cfg.heldout_sigma, cfg.seed, area=sum(cfg.crop_scale) / 2)

    def snapshot(step: int) -> TrainState:
        return TrainState(step=step, operator={k: v.detach().clone() for k, v in operator.state_dict().items()},
                          ema=None if ema is None else {k: v.detach().clone() for k, v in ema.state_dict().items()},
                          optimizer=copy.deepcopy(opt.state_dict()), config=cfg.to_dict(), curve=list(curve))

    def record(step: int, train_loss: float) -> dict | None:
        if heldout is None:
            return None
        ev = evaluate(ema if ema is not None else operator.eval(), heldout["degradation"], heldout)
        operator.train()
        curve.append({"step": step, "train_loss": train_loss, "heldout_l1": ev["operator"]["l1"],
                      "identity_l1": ev["identity"]["l1"], "naive_l1": ev["naive_latent"]["l1"]})
        return ev

    def fresh_batch(g: torch.Generator, n: int, per_sample_sigma: bool):
        x = torch.stack([augment(random_crop(imgs[int(torch.randint(0, len(imgs), (), generator=g))],
                                             cfg.crop_size, cfg.crop_scale, g), cfg, g)
                         for _ in range(n)]).to(device)
        if per_sample_sigma:
            sigma = torch.tensor([_uniform(g, *cfg.sigma_range) for _ in range(n)], device=device)
        else:
            sigma = torch.full((n,), _uniform(g, *cfg.sigma_range), device=device)
        deg = _training_degradation(degradation, n, cfg.crop_size, g).to(device)
        return (*make_pairs(encode, deg, x, sigma, g), sigma)

    pool = None
    if cfg.pool_size:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 999_983)
        chunks = []
        for i in range(0, cfg.pool_size, cfg.batch_size):
            if should_stop is not None:
                should_stop()
            chunks.append(fresh_batch(g, min(cfg.batch_size, cfg.pool_size - i), per_sample_sigma=True))
            if progress is not None:
                progress(start, cfg.steps, {"phase": "encoding", "encoded": i + len(chunks[-1][0]),
                                            "pool_size": cfg.pool_size})
        pool = [None if chunks[0][k] is None else torch.cat([c[k] for c in chunks]) for k in range(4)]

    t0 = time.time()
    smoothed = None
    last_eval = None
    for step in range(start, cfg.steps):
        if should_stop is not None:
            should_stop()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if pool is not None:
            idx = torch.randint(0, cfg.pool_size, (cfg.batch_size,), generator=g)
            z_in, target, mask, sigma = (None if t is None else t[idx] for t in pool)
        else:
            z_in, target, mask, sigma = fresh_batch(g, cfg.batch_size, per_sample_sigma=False)
        pred = operator(z_in, sigma_y=sigma, mask=mask)
        loss = (pred - target).abs().mean() if cfg.loss == "l1" else (pred - target).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(operator.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, po in zip(ema.parameters(), operator.parameters(), strict=True):
                    pe.lerp_(po, 1 - cfg.ema_decay)
        lv = float(loss.detach())
        smoothed = lv if smoothed is None else 0.95 * smoothed + 0.05 * lv
        done = step + 1
        if heldout is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            last_eval = record(done, smoothed)
            if state_path is not None:
                snapshot(done).save(state_path)
        if progress is not None:
            progress(done, cfg.steps, {"loss": lv, "smoothed": smoothed, "lr": _lr_at(cfg, step),
                                       "heldout": curve[-1] if curve else None})

    final = ema if ema is not None else operator
    final.eval()
    if heldout is not None and last_eval is None:
        last_eval = record(cfg.steps, smoothed if smoothed is not None else float("nan"))
        final.eval()
    state = snapshot(cfg.steps)
    if state_path is not None:
        state.save(state_path)
    report = {
        "steps": cfg.steps,
        "resumed_from": start or None,
        "images": len(imgs),
        "heldout_images": len(held),
        "final_train_loss": smoothed,
        "loss": cfg.loss,
        "heldout": last_eval,
        "curve": curve,
        "seconds": round(time.time() - t0, 2),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
    }
    if last_eval is not None:
        op_l1 = last_eval["operator"]["l1"]
        report["beats_identity"] = op_l1 < last_eval["identity"]["l1"]
        report["beats_naive_latent"] = op_l1 < last_eval["naive_latent"]["l1"]
    for p in final.parameters():
        p.requires_grad_(False)
    return TrainResult(operator=final, report=report, state=state)


def format_report(report: dict) -> str:
    """A few human lines for the UI / command line."""
    lines = [f"steps {report['steps']}, {report['images']} training images, {report['heldout_images']} held out, "
             f"{report['seconds']:.0f} s; final train {report['loss']} {report['final_train_loss']:.4f}"]
    ev = report.get("heldout")
    if ev:
        lines.append("held-out latent L1 (lower is better): "
                     f"operator {ev['operator']['l1']:.4f} | identity {ev['identity']['l1']:.4f} | "
                     f"degradation-on-latent {ev['naive_latent']['l1']:.4f}")
        best = min(ev["identity"]["l1"], ev["naive_latent"]["l1"])
        if ev["operator"]["l1"] < best:
            lines.append(f"operator error is {ev['operator']['l1'] / best:.0%} of the best trivial baseline")
        else:
            lines.append("WARNING: the operator does not beat the trivial baselines yet: train longer or on more images")
    return "\n".join(lines)
