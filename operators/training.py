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
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config.fields import SettingError, Settings, setting
from .degradations import Degradation, build_degradation
from .fidelity import HeldoutSet, decoded_fidelity, latent_errors, verdict
from .network import LatentOperator, PhysicsOperator
from .physics import LATENT_CLAMP

_STATE_FORMAT = "comfyui-silo.train-state"


class TrainingDataError(ValueError):
    """Training data that cannot be used (checked before any training); ``field`` names it (``"images"``,
    ``"heldout_images"``, ``"degradation"``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TrainSettings(Settings):
    """Every setting of an operator training run, declared once.

    The Train Latent Operator node shows the fields marked as widgets (in this order: ``steps`` … ``seed``); the
    ``train-operator`` command line offers every field as ``--name``. The node's default of 1000 steps is the
    default everywhere (it was 2000 in the core and the command line before, 1000 on the node).
    """

    OWNER: ClassVar[str] = "training"

    steps: int = setting(1000, min=1, max=1_000_000,
                         tooltip="Optimiser steps (the paper trained far longer; 1000-5000 is a useful start).")
    batch_size: int = setting(8, min=1, max=256, tooltip="Crops per step.")
    crop_size: int = setting(256, min=16, max=2048, step=8,
                             tooltip="Training crop size in pixels; images must be at least this large.")
    learning_rate: float = setting(1e-3, min=1e-6, max=1e-1, step=1e-5, tooltip="AdamW learning rate (cosine schedule).")
    max_noise_sigma: float = setting(0.05, min=0.0, max=0.5, step=0.005,
                                     tooltip="Measurement-noise levels drawn during training, up to this std "
                                             "(0-1 scale).")
    # Latent cache: encode this many augmented (input, target) pairs once and train on minibatches drawn from them.
    # Much faster with slow encoders (a VAE on a CPU), at the price of less augmentation. None: fresh pairs each step.
    pool_size: int | None = setting(512, none_as=0, min=1, max=100_000,
                                    tooltip="N: encode N augmented pairs once and train on them (2N VAE encodes "
                                            "instead of two per crop and step: minutes instead of hours on a CPU). "
                                            "0: fresh pairs every step (more variety; cheap on a GPU).")
    seed: int = setting(0, min=0, max=2**31 - 1, tooltip="Seed of crops, noise and init.")
    # ---- command line / Python only
    min_noise_sigma: float = setting(0.0, min=0.0, max=0.5, widget=False,
                                     tooltip="Lowest measurement-noise std drawn during training (0-1 scale).")
    weight_decay: float = setting(1e-4, min=0.0, max=1.0, widget=False, tooltip="AdamW weight decay.")
    lr_schedule: str = setting("cosine", choices=("cosine", "constant"), widget=False,
                               tooltip="Learning-rate schedule after the warm-up.")
    warmup_steps: int = setting(50, min=0, max=1_000_000, widget=False, tooltip="Linear learning-rate warm-up steps.")
    loss: str = setting("l1", choices=("l1", "l2"), widget=False, tooltip="Training loss (the paper: L1).")
    crop_scale_min: float = setting(0.3, min=0.01, max=1.0, widget=False,
                                    tooltip="Smallest random crop, as a fraction of the image's shorter side squared.")
    crop_scale_max: float = setting(1.0, min=0.01, max=1.0, widget=False,
                                    tooltip="Largest random crop, as a fraction of the image's shorter side squared.")
    hflip: bool = setting(True, widget=False, tooltip="Random horizontal flips.")
    vflip: bool = setting(True, widget=False, tooltip="Random vertical flips.")
    color_jitter: float = setting(0.05, min=0.0, max=0.5, widget=False,
                                  tooltip="Brightness/contrast/saturation jitter amplitude.")
    ema_decay: float | None = setting(None, none_as=0.0, min=0.0, max=1.0, widget=False,
                                      tooltip="EMA decay of the weights, e.g. 0.999")
    eval_every: int = setting(100, min=1, max=1_000_000, widget=False, tooltip="Held-out evaluation every N steps.")
    heldout_fraction: float = setting(0.1, min=0.0, max=0.9, widget=False,
                                      tooltip="Fraction of the images held out for the fidelity report.")
    heldout_sigma: float = setting(0.0, min=0.0, max=0.5, widget=False,
                                   tooltip="Measurement-noise std of the held-out pairs (0: noiseless targets; noise "
                                           "moves a real VAE's latents by 30-65 % and would hide the operator's "
                                           "own error).")
    grad_clip: float | None = setting(1.0, none_as=0.0, min=0.0, max=1e6, widget=False,
                                      tooltip="Gradient-norm clip")
    architecture: str = setting("physics", choices=("physics", "latent"), widget=False,
                                tooltip="physics: PhysicsOperator (the exact degradation between a small decoder and "
                                        "encoder; measured best). latent: the earlier plain latent UNet "
                                        "(LatentOperator).")
    clean_fraction: float = setting(0.5, min=0.0, max=1.0, widget=False,
                                    tooltip="Share of training pairs with a noiseless measurement (sigma 0); the "
                                            "rest draw sigma from min_noise_sigma..max_noise_sigma.")
    pixel_loss_weight: float = setting(10.0, min=0.0, max=1000.0, widget=False,
                                       tooltip="Weight of the pixel loss that teaches a physics operator's decoder "
                                               "to reproduce the clean crop (L1 on 0-1 pixels).")
    fidelity_crops: int = setting(16, min=0, max=100_000, widget=False,
                                  tooltip="Held-out crops decoded (three decodes each) for the decoded-fidelity "
                                          "report when a decoder is given; 0: all of them.")
    precision: str = setting("auto", choices=("auto", "float32", "bfloat16"), widget=False,
                             tooltip="Operator arithmetic while training: auto = bfloat16 autocast where the device "
                                     "runs it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else float32. The "
                                     "degradation itself always runs in float32; files are saved in float32.")
    autoencoder_precision: str = setting("auto", choices=("auto", "float32", "bfloat16"), widget=False,
                                         tooltip="The encoder's (and the report's decoder's) arithmetic while "
                                                 "training on a CPU: auto = bfloat16 autocast on CPUs with "
                                                 "AMX/AVX512-BF16 (2.6x the encodes/s for taef2 at the same "
                                                 "operator quality), else float32. On a GPU the host's VAE dtype "
                                                 "decides; bfloat16 forces autocast there too.")

    def validate(self) -> None:
        if self.crop_size % 8:
            raise SettingError("crop_size", f"training setting 'crop_size' must be a multiple of 8, "
                                            f"got {self.crop_size}")
        if self.min_noise_sigma > self.max_noise_sigma:
            raise SettingError("min_noise_sigma", f"training setting 'min_noise_sigma' ({self.min_noise_sigma}) must "
                                                  f"not exceed 'max_noise_sigma' ({self.max_noise_sigma})")
        if self.crop_scale_min > self.crop_scale_max:
            raise SettingError("crop_scale_min", f"training setting 'crop_scale_min' ({self.crop_scale_min}) must "
                                                 f"not exceed 'crop_scale_max' ({self.crop_scale_max})")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise SettingError("ema_decay", f"training setting 'ema_decay' must be off or in (0, 1), "
                                            f"got {self.ema_decay}")
        if self.pool_size is not None and self.pool_size < self.batch_size:
            raise SettingError("pool_size", f"training setting 'pool_size' ({self.pool_size}) must be off (0) or "
                                            f"at least batch_size ({self.batch_size})")

    @property
    def crop_scale(self) -> tuple[float, float]:
        return self.crop_scale_min, self.crop_scale_max

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.min_noise_sigma, self.max_noise_sigma


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

def _as_image_list(images, field: str = "images") -> list[torch.Tensor]:
    """[N,3,H,W] tensor or list of [3,H,W] / [1,3,H,W] tensors -> list of [3,H,W]; NaN/inf refused here, before any
    training (a non-finite pixel would make every loss NaN, found only after the run)."""
    if torch.is_tensor(images):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise TrainingDataError(field, f"images must be [N,3,H,W] (values 0-1), got shape {tuple(images.shape)}")
        images = list(images)
    out = []
    for i, im in enumerate(images):
        if im.ndim == 4 and im.shape[0] == 1:
            im = im[0]
        if im.ndim != 3 or im.shape[0] != 3:
            raise TrainingDataError(field, f"image {i} must be [3,H,W] (values 0-1), got shape {tuple(im.shape)}")
        bad = int((~torch.isfinite(im)).sum())
        if bad:
            raise TrainingDataError(field, f"training image {i} has {bad} NaN or infinite value(s); every pixel must "
                                           "be a number in 0-1")
        out.append(im)
    if not out:
        raise TrainingDataError(field, "no training images were given")
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


def augment(crop: torch.Tensor, cfg: TrainSettings, g: torch.Generator) -> torch.Tensor:
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
    """The degradation of a batch of ``size``-pixel training crops.

    A degradation whose mask the user drew (``needs_mask``: mask_inpaint) is trained with that mask: it is resized
    to the crop (area average, then >= 0.5, as the degradation binarises masks; a non-square mask is stretched to
    the square crop), and a batch of masks gives each crop one of them drawn at random. Earlier versions drew random
    rectangles instead and ignored the mask. The operator still takes the mask as an input, so it also serves other
    masks, but it is fitted to the one the user gave.
    """
    if not degradation.needs_mask:
        return degradation
    masks = degradation.mask  # [M,1,H,W] binary, M = the mask batch
    if tuple(masks.shape[-2:]) != (size, size):
        masks = (F.interpolate(masks.float(), size=(size, size), mode="area") >= 0.5).float()
    pick = torch.randint(0, masks.shape[0], (batch,), generator=g) if masks.shape[0] > 1 else torch.zeros(batch).long()
    return build_degradation({"type": degradation.type_name}, mask=masks[pick])


@dataclass
class Pairs:
    """Training or held-out pairs: clean crops ``x``, ``z`` = E(x), ``target`` = E(lift(A(x) + n)) (latents clamped
    to [−4, 4] as in the paper), the noise std per pair ``sigma`` and the pixel mask (1 = missing; inpainting)."""

    x: torch.Tensor
    z: torch.Tensor
    target: torch.Tensor
    sigma: torch.Tensor
    mask: torch.Tensor | None

    def take(self, idx: torch.Tensor) -> Pairs:
        """The pairs at ``idx``, with images and masks as float32 again when the pool holds them compactly."""
        x = self.x[idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        mask = None if self.mask is None else self.mask[idx].float()
        return Pairs(x, self.z[idx], self.target[idx], self.sigma[idx], mask)

    def compact(self) -> Pairs:
        """The same pairs with the clean crops as uint8 and masks as bool (a pool of 512 crops of 256 px: 100 MB of
        images instead of 400 MB; the crops are only the pixel target of a physics operator's decoder)."""
        x = (self.x.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return Pairs(x, self.z, self.target, self.sigma, None if self.mask is None else self.mask >= 0.5)

    @staticmethod
    def cat(parts: Sequence[Pairs]) -> Pairs:
        masks = [p.mask for p in parts]
        return Pairs(*(torch.cat([getattr(p, k) for p in parts]) for k in ("x", "z", "target", "sigma")),
                     None if masks[0] is None else torch.cat(masks))


def make_pairs(encode: Callable[[torch.Tensor], torch.Tensor], degradation: Degradation, x: torch.Tensor,
               sigma: torch.Tensor, g: torch.Generator) -> Pairs:
    """The :class:`Pairs` of a batch of clean crops ``x`` (one encoder call for inputs and targets together)."""
    with torch.no_grad():
        y = degradation(x)
        noise = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device) * sigma.view(-1, 1, 1, 1).to(y)
        lifted = degradation.lift((y + noise).clamp(0, 1), size=tuple(x.shape[-2:]))
        both = encode(torch.cat([x, lifted])).to(x.device).float().clamp(-LATENT_CLAMP, LATENT_CLAMP)
        mask = degradation.pixel_mask(x.shape, device=x.device)
    return Pairs(x, both[: x.shape[0]], both[x.shape[0]:], sigma, mask)


def measured_images(degradation: Degradation, x: torch.Tensor) -> torch.Tensor:
    """The noiseless measurement at full size, lift(A(x)): what the VAE encodes and what decoded latents match."""
    with torch.no_grad():
        return degradation.lift(degradation(x), size=tuple(x.shape[-2:]))


def prepare_heldout(encode, degradation: Degradation, images: Sequence[torch.Tensor], size: int, sigma: float,
                    seed: int, area: float = 1.0) -> HeldoutSet:
    """Held-out pairs from 5 fixed crops per image, at the mean scale of the training crops; targets noiseless
    unless ``sigma`` > 0."""
    x = center_crops(images, size, per_image=5, area=area)
    g = torch.Generator().manual_seed(seed + 7919)
    deg = _training_degradation(degradation, x.shape[0], size, g).to(x.device)
    sig = torch.full((x.shape[0],), float(sigma), device=x.device)
    pairs = make_pairs(encode, deg, x, sig, g)
    return HeldoutSet(x=x, z=pairs.z, target=pairs.target, sigma=sig, mask=pairs.mask, degradation=deg,
                      measured=measured_images(deg, x))


def evaluate(operator, degradation: Degradation, heldout: HeldoutSet, downscale: int = 8) -> dict:
    """Held-out latent error of the operator next to the two trivial baselines (identity, degradation on the latent);
    ``degradation`` is kept for callers of the earlier signature (the held-out set carries its own)."""
    return latent_errors(operator, heldout, downscale)[0]


# ------------------------------------------------------------------------------------------ training

def _lr_at(cfg: TrainSettings, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        fast = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return torch.bfloat16 if any(f is not None and f() for f in fast) else None
    return None


def autoencoder_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the encoder/decoder callables under ``autoencoder_precision`` (None: as they are).

    ``auto`` only speeds up a CPU encoder: on a GPU the host already runs its VAE in the dtype it chose."""
    if precision == "auto" and device.type != "cpu":
        return None
    return autocast_dtype(precision, device)


def _autocast_calls(fn: Callable[[torch.Tensor], torch.Tensor] | None, dtype: torch.dtype | None,
                    device: torch.device):
    """``fn`` run under ``dtype`` autocast on ``device``'s type, returning float32 (``fn`` itself when no dtype)."""
    if fn is None or dtype is None:
        return fn

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return fn(x).float()

    return call


# the names the earlier ``TrainConfig`` stored in resume files: one name for a (low, high) pair of today's settings
_OLD_PAIRS = (("sigma_range", ("min_noise_sigma", "max_noise_sigma")),
              ("crop_scale", ("crop_scale_min", "crop_scale_max")))


def _renamed_settings(stored: dict) -> dict:
    """Settings stored in a resume file under today's names: files written by the earlier ``TrainConfig`` hold
    ``lr`` (now ``learning_rate``) and the pairs ``sigma_range`` and ``crop_scale`` (now two settings each)."""
    values = dict(stored)
    if "lr" in values:
        values["learning_rate"] = values.pop("lr")
    for old, (lo, hi) in _OLD_PAIRS:
        if old in values:
            pair = values.pop(old)
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise SettingError(old, f"training setting '{old}' must be (low, high), got {pair!r}")
            values[lo], values[hi] = pair
    return values


def _settings(config: TrainSettings | None, overrides: dict, resume: TrainState | None) -> TrainSettings:
    """``config`` with the keyword ``overrides``; a resumed run keeps the settings stored in its state."""
    base = config if config is not None else TrainSettings()
    cfg = TrainSettings.from_values({**base.widget_values(), **overrides})
    if resume is not None:  # a resumed run keeps the stored settings, except how long it runs and how often it reports
        known = {s.name for s in TrainSettings.specs()} | {"lr"} | {old for old, _ in _OLD_PAIRS}
        stored = {k: v for k, v in resume.config.items() if k in known and k not in ("steps", "eval_every")}
        cfg = TrainSettings.from_values({**cfg.widget_values(), **_renamed_settings(stored)})
    return cfg


def _split_images(images, heldout_images, cfg: TrainSettings) -> tuple[list, list]:
    imgs = _as_image_list(images)
    if heldout_images is None:
        n_held = int(round(len(imgs) * cfg.heldout_fraction))
        if cfg.heldout_fraction > 0 and len(imgs) >= 2:
            n_held = max(1, n_held)
        held, imgs = imgs[len(imgs) - n_held:], imgs[: len(imgs) - n_held]
    else:
        held = _as_image_list(heldout_images, "heldout_images")
    if not imgs:
        raise ValueError("no training images left after holding some out; give more images or heldout_fraction=0")
    small = [tuple(im.shape[-2:]) for im in imgs if min(im.shape[-2:]) < cfg.crop_size * cfg.crop_scale[0] ** 0.5 / 2]
    if small:
        raise TrainingDataError("images", f"training images of size {small[0]} are too small for crop_size "
                                f"{cfg.crop_size}; use larger images or a smaller crop_size")
    return imgs, held


def _new_operator(encode, degradation: Degradation, cfg: TrainSettings, operator, operator_config,
                  device: torch.device) -> tuple[torch.nn.Module, int]:
    """The operator to train (given, or fresh from ``architecture``) and the encoder's downscale factor."""
    probe = encode(torch.zeros(1, 3, cfg.crop_size, cfg.crop_size, device=device))
    downscale = max(1, round(cfg.crop_size / probe.shape[-1]))
    if operator is not None:
        if operator_config:
            raise ValueError("pass either operator or operator_config, not both")
        return operator, downscale
    kwargs = {"latent_channels": probe.shape[1], "use_mask": degradation.is_inpainting, **(operator_config or {})}
    if cfg.architecture == "physics":
        kwargs = {"degradation": degradation.spec, "downscale": downscale, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = (PhysicsOperator if cfg.architecture == "physics" else LatentOperator)(**kwargs)
    return module, downscale


class _PairSource:
    """Training pairs for step k: drawn from a pool encoded once, or fresh (augmented crops encoded each step)."""

    def __init__(self, encode, degradation: Degradation, imgs: list, cfg: TrainSettings, device: torch.device,
                 should_stop, progress, start: int):
        self.encode, self.degradation, self.imgs, self.cfg, self.device = encode, degradation, imgs, cfg, device
        self.encodes = 0
        self.encode_seconds = 0.0
        self.pool = self._fill_pool(should_stop, progress, start) if cfg.pool_size else None

    def _sigmas(self, g: torch.Generator, n: int) -> torch.Tensor:
        cfg = self.cfg
        return torch.tensor([0.0 if float(torch.rand((), generator=g)) < cfg.clean_fraction
                             else _uniform(g, *cfg.sigma_range) for _ in range(n)], device=self.device)

    def fresh(self, g: torch.Generator, n: int) -> Pairs:
        cfg = self.cfg
        x = torch.stack([augment(random_crop(self.imgs[int(torch.randint(0, len(self.imgs), (), generator=g))],
                                             cfg.crop_size, cfg.crop_scale, g), cfg, g)
                         for _ in range(n)]).to(self.device)
        deg = _training_degradation(self.degradation, n, cfg.crop_size, g).to(self.device)
        t0 = time.perf_counter()
        pairs = make_pairs(self.encode, deg, x, self._sigmas(g, n), g)
        self.encode_seconds += time.perf_counter() - t0
        self.encodes += 2 * n
        return pairs

    def _fill_pool(self, should_stop, progress, start: int) -> Pairs:
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 999_983)
        chunks = []
        for i in range(0, cfg.pool_size, cfg.batch_size):
            if should_stop is not None:
                should_stop()
            chunks.append(self.fresh(g, min(cfg.batch_size, cfg.pool_size - i)))
            if progress is not None:
                progress(start, cfg.steps, {"phase": "encoding", "encoded": i + len(chunks[-1].x),
                                            "pool_size": cfg.pool_size})
        return Pairs.cat(chunks).compact()

    def batch(self, step: int) -> tuple[Pairs, torch.Generator]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        if self.pool is not None:
            return self.pool.take(torch.randint(0, self.cfg.pool_size, (self.cfg.batch_size,), generator=g)), g
        return self.fresh(g, self.cfg.batch_size), g


def _loss(operator, batch: Pairs, cfg: TrainSettings, g: torch.Generator, amp: torch.dtype | None) -> torch.Tensor:
    """Latent loss (L1 or L2) of the prediction; a physics operator adds its decoder's pixel loss."""
    device = batch.z.device
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        if hasattr(operator, "fit_outputs"):
            pred, estimate = operator.fit_outputs(batch.z, batch.sigma, batch.mask, batch.x, generator=g)
        else:
            pred, estimate = operator(batch.z, sigma_y=batch.sigma, mask=batch.mask), None
    err = pred.float() - batch.target
    loss = err.abs().mean() if cfg.loss == "l1" else err.pow(2).mean()
    if estimate is not None and cfg.pixel_loss_weight > 0:
        loss = loss + cfg.pixel_loss_weight * (estimate.float() - batch.x).abs().mean()
    return loss


def _optimise(operator, ema, opt, source: _PairSource, cfg: TrainSettings, start: int, amp, record, progress,
              should_stop) -> tuple[float | None, dict | None]:
    smoothed, last_eval = None, None
    for step in range(start, cfg.steps):
        if should_stop is not None:
            should_stop()
        batch, g = source.batch(step)
        loss = _loss(operator, batch, cfg, g, amp)
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
        if done % cfg.eval_every == 0 or done == cfg.steps:
            last_eval = record(done, smoothed) or last_eval
        if progress is not None:
            progress(done, cfg.steps, {"loss": lv, "smoothed": smoothed, "lr": _lr_at(cfg, step)})
    return smoothed, last_eval


@dataclass
class _Run:
    """One training run: the operator, its EMA copy and optimiser, the held-out set, the curve so far, where the
    resumable state is saved."""

    cfg: TrainSettings
    operator: torch.nn.Module
    ema: torch.nn.Module | None
    opt: torch.optim.Optimizer
    downscale: int
    state_path: str | Path | None
    heldout: HeldoutSet | None = None
    start: int = 0
    curve: list = field(default_factory=list)

    def restore(self, resume: TrainState) -> None:
        """Continue from ``resume``: weights, EMA weights, optimiser moments, the step reached and the curve."""
        self.operator.load_state_dict(resume.operator)
        if self.ema is not None and resume.ema is not None:
            self.ema.load_state_dict(resume.ema)
        self.opt.load_state_dict(resume.optimizer)
        self.start, self.curve = resume.step, list(resume.curve)

    def snapshot(self, step: int) -> TrainState:
        """A copy of everything needed to resume at ``step``."""
        ema = self.ema
        return TrainState(step=step, operator={k: v.detach().clone() for k, v in self.operator.state_dict().items()},
                          ema=None if ema is None else {k: v.detach().clone() for k, v in ema.state_dict().items()},
                          optimizer=copy.deepcopy(self.opt.state_dict()), config=self.cfg.as_dict(),
                          curve=list(self.curve))

    def record(self, step: int, train_loss: float) -> dict | None:
        """An evaluation: the held-out errors added to the curve (returned), the state saved when asked."""
        ev = None
        if self.heldout is not None:
            model = self.ema if self.ema is not None else self.operator.eval()
            ev = evaluate(model, self.heldout.degradation, self.heldout, self.downscale)
            self.operator.train()
            self.curve.append({"step": step, "train_loss": train_loss, "heldout_l1": ev["operator"]["l1"],
                               "identity_l1": ev["identity"]["l1"], "naive_l1": ev["naive_latent"]["l1"],
                               "heldout_rel": ev["operator"]["rel_l2"]})
        if self.state_path is not None:
            self.snapshot(step).save(self.state_path)
        return ev


def _start_run(encode, degradation: Degradation, cfg: TrainSettings, operator, operator_config, device: torch.device,
               resume: TrainState | None, held: list, state_path) -> _Run:
    """The operator to train with its EMA copy and optimiser, restored from ``resume``, and the held-out pairs."""
    operator, downscale = _new_operator(encode, degradation, cfg, operator, operator_config, device)
    operator = operator.to(device).float().train()
    ema = copy.deepcopy(operator).eval().requires_grad_(False) if cfg.ema_decay else None
    opt = torch.optim.AdamW(operator.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    run = _Run(cfg, operator, ema, opt, downscale, state_path)
    if resume is not None:
        run.restore(resume)
    if held:
        run.heldout = prepare_heldout(encode, degradation.to(device), [im.to(device) for im in held], cfg.crop_size,
                                      cfg.heldout_sigma, cfg.seed, area=sum(cfg.crop_scale) / 2)
    return run


def _finish(run: _Run, source: _PairSource, imgs: list, held: list, decode, smoothed: float | None,
            last_eval: dict | None, seconds: float) -> TrainResult:
    """The trained operator (EMA weights when EMA is on) frozen, its final evaluation, state and report."""
    cfg = run.cfg
    final = (run.ema if run.ema is not None else run.operator).eval()
    if run.heldout is not None and last_eval is None:
        last_eval = run.record(cfg.steps, smoothed if smoothed is not None else float("nan"))
        final.eval()
    state = run.snapshot(cfg.steps)
    if run.state_path is not None:
        state.save(run.state_path)
    report = _report(cfg, run.start, imgs, held, smoothed, last_eval, run.curve, seconds, source, run.downscale,
                     final)
    if run.heldout is not None:
        report["fidelity"] = _fidelity(final, run.heldout, decode, run.downscale, cfg.fidelity_crops)
    for p in final.parameters():
        p.requires_grad_(False)
    return TrainResult(operator=final, report=report, state=state)


def train_operator(
    encode: Callable[[torch.Tensor], torch.Tensor],
    degradation: Degradation | dict,
    images,
    *,
    config: TrainSettings | None = None,
    operator: torch.nn.Module | None = None,
    operator_config: dict | None = None,
    heldout_images=None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    resume: TrainState | str | Path | None = None,
    state_path: str | Path | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], None] | None = None,
    device: str | torch.device = "cpu",
    **overrides,
) -> TrainResult:
    """Fit a latent operator so that H(E(x̃), σ) ≈ E(lift(A(x̃)+n)).

    Args:
        encode: image [B,3,H,W] in [0,1] → latent [B,C,H/s,W/s] in the sampler's (scaled) latent space; the
            downscale factor ``s`` is measured from it, never assumed.
        degradation: a :class:`Degradation` or its spec.
        images: [N,3,H,W] tensor or a list of [3,H,W] tensors (sizes may differ), values in [0,1].
        config / overrides: :class:`TrainSettings`, and/or its fields as keywords (``steps=500, batch_size=4``;
            a widget's "off" value such as ``pool_size=0`` means None). Checked before anything else.
        operator: start from this operator (default: a fresh identity operator of ``architecture``).
        operator_config: constructor arguments for the fresh operator (initialised from ``seed``).
        heldout_images: images for the held-out evaluation; default: ``heldout_fraction`` of ``images``.
        decode: latent → image [B,3,H,W] in [0,1] (the VAE decoder), optional: with it the report also gives the
            decoded fidelity (PSNR/SSIM next to the autoencoder's floor and identity, the share of the gap closed)
            and the verdict uses it. Used for the report only, never for training.
        resume: a :class:`TrainState` (or its file) to continue from.
        state_path: where to save a resumable state at every evaluation and at the end.
        progress: called as ``progress(step, total, info)`` after every step (and while the pool is encoded).
        should_stop: called every step; raise from it to abort (ComfyUI's interrupt).
    Returns:
        :class:`TrainResult` with the operator (EMA weights when EMA is on), a JSON-able report and the final state.
    """
    if isinstance(resume, (str, Path)):
        resume = TrainState.load(resume)
    cfg = _settings(config, overrides, resume)
    if isinstance(degradation, dict):
        degradation = build_degradation(degradation)
    imgs, held = _split_images(images, heldout_images, cfg)
    device = torch.device(device)
    ae_dtype = autoencoder_dtype(cfg.autoencoder_precision, device)
    encode, decode = _autocast_calls(encode, ae_dtype, device), _autocast_calls(decode, ae_dtype, device)
    run = _start_run(encode, degradation, cfg, operator, operator_config, device, resume, held, state_path)
    source = _PairSource(encode, degradation, imgs, cfg, device, should_stop, progress, run.start)
    t0 = time.time()
    smoothed, last_eval = _optimise(run.operator, run.ema, run.opt, source, cfg, run.start,
                                    autocast_dtype(cfg.precision, device), run.record, progress, should_stop)
    result = _finish(run, source, imgs, held, decode, smoothed, last_eval, time.time() - t0)
    result.report["autoencoder_dtype"] = str(ae_dtype).replace("torch.", "") if ae_dtype else "as given"
    return result


def _report(cfg, start, imgs, held, smoothed, last_eval, curve, seconds, source, downscale, final) -> dict:
    steps_run = cfg.steps - start
    optimise_seconds = max(seconds - (source.encode_seconds if source.pool is None else 0.0), 1e-9)
    report = {
        "steps": cfg.steps,
        "resumed_from": start or None,
        "images": len(imgs),
        "heldout_images": len(held),
        "final_train_loss": smoothed,
        "loss": cfg.loss,
        "architecture": type(final).__name__,
        "downscale": downscale,
        "heldout": last_eval,
        "curve": curve,
        "seconds": round(seconds + (source.encode_seconds if source.pool is not None else 0.0), 2),
        "encodes": source.encodes,
        "encode_seconds": round(source.encode_seconds, 2),
        "encodes_per_second": round(source.encodes / source.encode_seconds, 2) if source.encode_seconds else None,
        "steps_per_second": round(steps_run / optimise_seconds, 3) if steps_run else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.as_dict(),
    }
    if last_eval is not None:
        op_l1 = last_eval["operator"]["l1"]
        report["beats_identity"] = op_l1 < last_eval["identity"]["l1"]
        report["beats_naive_latent"] = op_l1 < last_eval["naive_latent"]["l1"]
    return report


def _fidelity(final, heldout: HeldoutSet, decode, downscale: int, crops: int) -> dict:
    """The final held-out fidelity: latent errors, decoded fidelity (on the first ``crops`` held-out crops, 0: all)
    when a decoder is given, and the verdict."""
    latent, pred = latent_errors(final, heldout, downscale)
    decoded = None
    if decode is not None:
        n = len(pred) if crops <= 0 else min(crops, len(pred))
        decoded = decoded_fidelity(decode, heldout.subset(n), pred[:n])
        decoded["crops"] = n
    return {"latent": latent, "decoded": decoded, "verdict": verdict(latent, decoded),
            "heldout_sigma": float(heldout.sigma[0]) if len(heldout.sigma) else 0.0}


def format_report(report: dict) -> str:
    """A few human lines for the UI / command line: what the operator achieves next to the references, and the
    verdict."""
    lines = [f"steps {report['steps']}, {report['images']} training images, {report['heldout_images']} held out, "
             f"{report['seconds']:.0f} s; final train {report['loss']} {report['final_train_loss']:.4f}"]
    fid = report.get("fidelity")
    if fid:
        lines += fidelity_lines(fid)
    elif report.get("heldout"):
        ev = report["heldout"]
        lines.append("held-out latent L1 (lower is better): "
                     f"operator {ev['operator']['l1']:.4f} | identity {ev['identity']['l1']:.4f} | "
                     f"degradation-on-latent {ev['naive_latent']['l1']:.4f}")
        lines.append(verdict(ev)["text"])
    return "\n".join(lines)


def fidelity_lines(fid: dict) -> list[str]:
    """The fidelity facts as short lines (also shown by the Latent Degradation Operator node from the file)."""
    lat = fid["latent"]
    lines = ["held-out latent error ‖H(E x) − E(A x)‖/‖E(A x)‖ (lower is better): "
             f"operator {lat['operator']['rel_l2']:.3f} | identity {lat['identity']['rel_l2']:.3f} | "
             f"degradation-on-latent {lat['naive_latent']['rel_l2']:.3f}"]
    dec = fid.get("decoded")
    if dec:
        gap = dec.get("gap_closed")
        lines.append("decoded vs the degraded photo, PSNR / SSIM: "
                     f"operator {dec['operator']['psnr']:.1f} dB / {dec['operator']['ssim']:.3f} | "
                     f"VAE floor {dec['floor']['psnr']:.1f} dB / {dec['floor']['ssim']:.3f} | "
                     f"identity {dec['identity']['psnr']:.1f} dB / {dec['identity']['ssim']:.3f}"
                     + (f" | gap closed {gap:.0%}" if gap is not None else ""))
    lines.append(fid["verdict"]["text"])
    return lines
