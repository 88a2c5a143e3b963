"""Optional import of the SILO paper's published CNN operators (``*.pt`` state dicts of its ``DegradationModel``).

Facts established by reading the public repository ``ronraphaeli/SILO`` (commit 9a949ce, files ``silo_utils.py``,
``silo_sample.py``, ``training/silo_cnn_train.py``, ``scripts/cnn_ffhq_sr_8.sh``); the code below is our own:

* The published CNN operators are built as ``DegradationModel(4, layer_norm=True, sigma_condition=True)`` and loaded
  with a strict ``load_state_dict`` of the unpickled file, so their key names are exactly those of that module.
  ``sigma_condition`` is a bool used as an int (+1 channel). State-dict keys (``nn.Sequential`` indices; the ReLU /
  LeakyReLU entries hold no parameters)::

      sigma_condition_precondition.0  Linear(1280 → 32)      .1 LeakyReLU(0.01)   .2 Linear(32 → 64·64)
      encoder.0  Conv2d(C+1 → 17, 3, p1)   encoder.1  LayerNorm([17, 64, 64])    (ReLU at .2)
      encoder.3  Conv2d(17 → 33)           encoder.4  LayerNorm([33, 64, 64])    (ReLU at .5)
      encoder.6  Conv2d(33 → 65)           encoder.7  LayerNorm([65, 64, 64])    (ReLU at .8)
      encoder.9  Conv2d(65 → 128)          encoder.10 LayerNorm([128, 64, 64])   (ReLU at .11)
      decoder.0  ConvTranspose2d(128 → 64, 3, s1, p1)  decoder.1 LayerNorm([64, 64, 64])   (ReLU)
      decoder.3  ConvTranspose2d(64 → 32)              decoder.4 LayerNorm([32, 64, 64])   (ReLU)
      decoder.6  ConvTranspose2d(32 → 16)              decoder.7 LayerNorm([16, 64, 64])   (ReLU)
      adjust_encoding.0  Conv2d(128+1 → 16, 1)         adjust_encoding.1 LayerNorm([16, 64, 64])  (ReLU)
      processing.0  Conv2d(16 → 16, 3, p1)  processing.1 LayerNorm([16, 64, 64])  (ReLU)  processing.3 Conv2d(16 → C)

  About 3.5 M parameters, 3.17 M of them LayerNorm affine weights over fixed ``[C, 64, 64]`` maps, hence the
  hard 64×64-latent (512×512-image) limit.
* Forward: the σ-embedding (``[B, 1280]``) goes through ``sigma_condition_precondition`` and is reshaped to a
  ``[B, 1, 64, 64]`` map, concatenated to ẑ₀ (5 channels) → ``encoder`` (128 ch) → ``decoder`` (16 ch); the
  ``encoder`` output concatenated with the same σ map → ``adjust_encoding`` (16 ch); the two are *added* and passed
  through ``processing``. There is no identity/residual path: the output is the predicted degraded latent itself.
* The 1280-d σ-embedding is **not** part of the operator: it is the Stable Diffusion UNet's own timestep embedding
  (diffusers ``unet.time_proj`` + ``unet.time_embedding``, i.e. ComfyUI's ``time_embed.0/2`` linear layers with a
  SiLU between them) evaluated at the fake timestep ``t = (σ_theirs / 0.1) · 999``. Their σ is the std of noise
  added to images in [-1, 1] (their README: "the true amount is half"), so with our σ_y on the [0, 1] scale
  ``t = 2 σ_y / 0.1 · 999 = 19980 σ_y``. ``time_proj`` is the standard sinusoidal embedding of the SD1.x UNet
  (320 channels, ``flip_sin_to_cos=True``, ``freq_shift=0``: ``[cos, sin]`` of ``t · 10000^(-i/160)``).
  Training used ``--pretrained_model_name_or_path`` (default ``stablediffusionapi/realistic-vision-v51``) and the
  sampler's default prior is also Realistic Vision v5.1, so that UNet's time-embedding weights are the ones the
  published operators saw. We cannot ship those weights; a σ-conditioned reference operator therefore needs them
  attached, either at import (``time_embedding=`` any state dict holding ``time_embed.0/2.*``,
  ``time_embedding.linear_1/2.*`` or bare ``0/2.*`` tensors, e.g. an SD1.5 checkpoint) or later with
  :meth:`SiloReferenceCNN.attach_time_embedding`; otherwise calling it raises a ``ValueError`` (or pass the
  embedding yourself as ``sigma_emb=``). They are stored in our file under ``time_embed.*`` (keys absent from the
  paper's files).
* Their training target was ``E(resize(A(x) + n))`` clamped to [-4, 4] (``--clamp``), latents scaled by the SD1.x
  VAE factor 0.18215 (= ComfyUI's SD15 latent format).

Not established (no published ``.pt`` file could be inspected here; the release archive ``trained_ckpt.zip`` is
not in the repository): the exact tensors of the published files. The key list above is derived from the code that
loads them strictly. The repository also ships a different architecture, ``preserve_LatentDegradationNetwork``
(used by ``scripts/cnn_coco_sr_4.sh``), and Readout-Guidance operators; neither is supported here and
:func:`import_reference_operator` says so when it recognises them. The BatchNorm variant (``layer_norm=False``) was
not published and is not supported.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .files import write_operator

__all__ = [
    "REFERENCE_LATENT_SIZE",
    "SIGMA_TO_TIMESTEP",
    "SiloReferenceCNN",
    "extract_time_embedding",
    "import_reference_operator",
]

REFERENCE_LATENT_SIZE = 64
#: σ_y ([0, 1] image scale) → the fake UNet timestep the paper's operators were trained with: (2 σ_y / 0.1) · 999.
SIGMA_TO_TIMESTEP = 2.0 * 999.0 / 0.1

_TIME_EMBED_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")


def _unet_timestep_features(t: torch.Tensor, channels: int) -> torch.Tensor:
    """SD1.x UNet sinusoidal timestep features: ``[cos, sin]`` of ``t · 10000^(-i / (channels/2))`` (float32)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def extract_time_embedding(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Find a UNet's timestep-embedding MLP in a state dict and return it as ``{"0.weight", "0.bias", "2.weight",
    "2.bias"}``.

    Accepted spellings (with any prefix, e.g. ``model.diffusion_model.``): ComfyUI/LDM ``time_embed.0.*`` /
    ``time_embed.2.*``, diffusers ``time_embedding.linear_1.*`` / ``time_embedding.linear_2.*``, or bare
    ``0.*`` / ``2.*`` / ``linear_1.*`` / ``linear_2.*``.
    """
    aliases = {
        "0.weight": ("time_embed.0.weight", "time_embedding.linear_1.weight"),
        "0.bias": ("time_embed.0.bias", "time_embedding.linear_1.bias"),
        "2.weight": ("time_embed.2.weight", "time_embedding.linear_2.weight"),
        "2.bias": ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    }
    bare = {
        "0.weight": "linear_1.weight",
        "0.bias": "linear_1.bias",
        "2.weight": "linear_2.weight",
        "2.bias": "linear_2.bias",
    }
    out: dict[str, torch.Tensor] = {}
    for key, suffixes in aliases.items():
        hits = [k for k in state_dict if any(k == s or k.endswith("." + s) for s in suffixes)]
        if not hits:
            hits = [k for k in (key, bare[key]) if k in state_dict]
        if len(hits) > 1:
            # Prefer the diffusion model's own embedding over e.g. a ControlNet's inside a merged file.
            preferred = [k for k in hits if "diffusion_model." in k]
            hits = preferred if len(preferred) == 1 else hits
        if len(hits) != 1:
            found = "none" if not hits else ", ".join(sorted(hits)[:4])
            raise ValueError(
                f"could not find a unique UNet time-embedding tensor for {key!r} (looked for time_embed.0/2.*, "
                f"time_embedding.linear_1/2.* or bare 0/2.*; found {found})"
            )
        value = state_dict[hits[0]]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"time-embedding entry {hits[0]!r} is not a tensor")
        out[key] = value
    w0, w2 = out["0.weight"], out["2.weight"]
    if w0.dim() != 2 or w2.dim() != 2 or w2.shape[1] != w0.shape[0]:
        raise ValueError(f"time-embedding weights have unexpected shapes {tuple(w0.shape)} and {tuple(w2.shape)}")
    return out


class SiloReferenceCNN(nn.Module):
    """The paper's CNN latent operator (``DegradationModel`` with ``layer_norm=True``), state-dict compatible.

    Only works on ``[B, C, 64, 64]`` latents (512×512 images with an /8 VAE): its LayerNorms are defined over fixed
    ``[C, 64, 64]`` maps. See the module docstring for the architecture and for how σ is embedded.

    Args:
        latent_channels: latent channels ``C`` (4 for the published SD1.5 operators).
        output_channels: output channels (``None`` = ``latent_channels``).
        sigma_condition: the published operators are σ-conditioned (``True``).
        time_embedding: whether this module holds the UNet timestep-embedding MLP (``time_embed.0/2``) used to embed
            σ. Set by :meth:`attach_time_embedding`; stored in :attr:`config` so saved files rebuild it.
        timestep_channels / time_embed_dim: sizes of that MLP (320 → 1280 for SD1.x).
    """

    def __init__(
        self,
        latent_channels: int = 4,
        output_channels: int | None = None,
        sigma_condition: bool = True,
        time_embedding: bool = False,
        timestep_channels: int = 320,
        time_embed_dim: int = 1280,
    ) -> None:
        super().__init__()
        self.latent_channels = int(latent_channels)
        self.output_channels = int(output_channels) if output_channels is not None else self.latent_channels
        self.sigma_condition = bool(sigma_condition)
        self.timestep_channels = int(timestep_channels)
        self.time_embed_dim = int(time_embed_dim)
        self.use_mask = False
        s = 1 if self.sigma_condition else 0
        n = REFERENCE_LATENT_SIZE

        if self.sigma_condition:
            self.sigma_condition_precondition = nn.Sequential(
                nn.Linear(self.time_embed_dim, 32), nn.LeakyReLU(), nn.Linear(32, n * n)
            )

        def conv_ln_relu(conv: nn.Module, ch: int) -> list[nn.Module]:
            return [conv, nn.LayerNorm([ch, n, n]), nn.ReLU()]

        enc_ch = [self.latent_channels + s, 16 + s, 32 + s, 64 + s, 128]
        enc: list[nn.Module] = []
        for cin, cout in zip(enc_ch[:-1], enc_ch[1:], strict=True):
            enc += conv_ln_relu(nn.Conv2d(cin, cout, 3, stride=1, padding=1), cout)
        self.encoder = nn.Sequential(*enc)

        dec_ch = [128, 64, 32, 16]
        dec: list[nn.Module] = []
        for cin, cout in zip(dec_ch[:-1], dec_ch[1:], strict=True):
            dec += conv_ln_relu(nn.ConvTranspose2d(cin, cout, 3, stride=1, padding=1), cout)
        self.decoder = nn.Sequential(*dec)

        self.adjust_encoding = nn.Sequential(*conv_ln_relu(nn.Conv2d(128 + s, 16, 1, stride=1), 16))
        self.processing = nn.Sequential(
            *conv_ln_relu(nn.Conv2d(16, 16, 3, stride=1, padding=1), 16),
            nn.Conv2d(16, self.output_channels, 3, stride=1, padding=1),
        )

        self.time_embed: nn.Sequential | None = None
        if time_embedding:
            self._build_time_embed()

    # ------------------------------------------------------------------ config / σ embedding
    def _build_time_embed(self) -> None:
        ref = self.encoder[0].weight
        self.time_embed = nn.Sequential(
            nn.Linear(self.timestep_channels, self.time_embed_dim),
            nn.SiLU(),
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
        ).to(device=ref.device, dtype=ref.dtype)

    @property
    def config(self) -> dict:
        return {
            "latent_channels": self.latent_channels,
            "output_channels": self.output_channels,
            "sigma_condition": self.sigma_condition,
            "time_embedding": self.time_embed is not None,
            "timestep_channels": self.timestep_channels,
            "time_embed_dim": self.time_embed_dim,
        }

    def reference_state_keys(self) -> list[str]:
        """State-dict keys of the paper's ``DegradationModel`` (i.e. without our optional ``time_embed.*``)."""
        return [k for k in self.state_dict() if not k.startswith("time_embed.")]

    def attach_time_embedding(self, weights: Mapping[str, torch.Tensor]) -> SiloReferenceCNN:
        """Attach the diffusion UNet's timestep-embedding MLP used to embed σ (see :func:`extract_time_embedding`
        for the accepted key spellings). Returns ``self``."""
        tensors = extract_time_embedding(weights)
        w0, w2 = tensors["0.weight"], tensors["2.weight"]
        expected = {
            "0.weight": (self.time_embed_dim, self.timestep_channels),
            "0.bias": (self.time_embed_dim,),
            "2.weight": (self.time_embed_dim, self.time_embed_dim),
            "2.bias": (self.time_embed_dim,),
        }
        bad = [
            f"{k}: {tuple(tensors[k].shape)} (expected {v})"
            for k, v in expected.items()
            if tuple(tensors[k].shape) != v
        ]
        if bad:
            raise ValueError(
                "the given UNet time embedding does not fit this reference operator (it expects an SD1.x-style "
                f"{self.timestep_channels}→{self.time_embed_dim} MLP; got w0 {tuple(w0.shape)}, w2 {tuple(w2.shape)}): "
                + "; ".join(bad)
            )
        if self.time_embed is None:
            self._build_time_embed()
        assert self.time_embed is not None
        self.time_embed.load_state_dict({k: v.detach() for k, v in tensors.items()}, strict=True)
        return self

    def embed_sigma(self, sigma_y, batch: int) -> torch.Tensor:
        """σ_y ([0, 1] image scale) → the ``[B, time_embed_dim]`` UNet time embedding at ``t = 19980 · σ_y``."""
        if self.time_embed is None:
            raise ValueError(
                "This reference SILO operator is σ-conditioned through the Stable Diffusion UNet's timestep "
                "embedding, which the paper's .pt files do not contain. Attach it: pass time_embedding=<SD1.5 "
                "checkpoint or UNet state dict> to import_reference_operator, or call "
                "module.attach_time_embedding(state_dict) (or pass sigma_emb= yourself)."
            )
        ref = self.encoder[0].weight
        if sigma_y is None:
            sigma = torch.zeros(batch, device=ref.device)
        elif isinstance(sigma_y, torch.Tensor):
            sigma = sigma_y.detach().to(device=ref.device, dtype=torch.float32).reshape(-1)
        else:
            sigma = torch.full((batch,), float(sigma_y), device=ref.device)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        elif sigma.numel() != batch:
            raise ValueError(f"sigma_y has {sigma.numel()} values but the latent batch is {batch}")
        feats = _unet_timestep_features(sigma * SIGMA_TO_TIMESTEP, self.timestep_channels).to(ref.dtype)
        return self.time_embed(feats)

    # ------------------------------------------------------------------ forward
    def forward(
        self, z: torch.Tensor, sigma_y=None, mask=None, *, sigma_emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the degraded latent. ``mask`` is accepted for interface compatibility and ignored (the paper's
        CNN has no mask input). ``sigma_emb`` (``[B, 1280]``) overrides the internal σ embedding."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"z must be a [B, C, h, w] latent tensor; got {getattr(z, 'shape', type(z).__name__)}")
        n = REFERENCE_LATENT_SIZE
        if tuple(z.shape[-2:]) != (n, n):
            raise ValueError(
                f"The SILO paper's reference CNN operator only works on {n}×{n} latents ({8 * n}×{8 * n} images): its "
                f"LayerNorms are fixed to [C, {n}, {n}] maps. Got a {z.shape[-2]}×{z.shape[-1]} latent. Resize/crop the "
                "image to 512×512, or use an operator trained with comfyui-silo (LatentOperator), which works at any size."
            )
        if z.shape[1] != self.latent_channels:
            raise ValueError(
                f"this reference operator expects {self.latent_channels}-channel latents, got {z.shape[1]}"
            )
        ref = self.encoder[0].weight
        b = z.shape[0]
        x = z.to(device=ref.device, dtype=ref.dtype)
        sigma_map = None
        if self.sigma_condition:
            emb = (
                self.embed_sigma(sigma_y, b) if sigma_emb is None else sigma_emb.to(device=ref.device, dtype=ref.dtype)
            )
            if emb.shape[0] == 1 and b > 1:
                emb = emb.expand(b, -1)
            sigma_map = self.sigma_condition_precondition(emb).reshape(b, 1, n, n)
            x = torch.cat([x, sigma_map], dim=1)
        encoded = self.encoder(x)
        decoded = self.decoder(encoded)
        if sigma_map is not None:
            encoded = torch.cat([encoded, sigma_map], dim=1)
        out = self.processing(decoded + self.adjust_encoding(encoded))
        return out.to(device=z.device, dtype=z.dtype)


# ---------------------------------------------------------------------- import
_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(sd: Mapping[str, object]) -> dict[str, object]:
    out = dict(sd)
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _describe_keys(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(pt_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a paper ``.pt`` file, read weights-only, unwrapped (``state_dict`` / ``model`` / ``module.``
    prefixes) and refused with a clear message when it is another kind of SILO operator or no state dict at all."""
    try:
        obj = torch.load(pt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means "not a weights-only state dict"
        raise ValueError(
            f"{pt_path.name} could not be read as a weights-only PyTorch state dict ({type(exc).__name__}: {exc}). "
            "Only the SILO paper's CNN operator files (raw state dicts of its DegradationModel) can be imported."
        ) from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{pt_path.name} does not contain a state dict (found {type(obj).__name__})")
    if "aggregation_network" in obj:
        raise ValueError(
            f"{pt_path.name} is a SILO Readout-Guidance operator (it holds 'aggregation_network'); only the paper's "
            "CNN operators (DegradationModel) can be imported."
        )
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and len(obj) <= 3:
            obj = inner
            break
    sd = _strip_prefixes(obj)
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{pt_path.name}: entries that are not tensors: {_describe_keys(not_tensors)}")
    if any(k.startswith(("identity_gate.", "initial_proj.", "pos_embedding.", "up_blocks.")) for k in sd):
        raise ValueError(
            f"{pt_path.name} is the paper's other CNN variant (preserve_LatentDegradationNetwork), not the "
            "DegradationModel CNN; it is not supported."
        )
    return sd


def _module_for(sd: Mapping[str, torch.Tensor]) -> SiloReferenceCNN:
    """A :class:`SiloReferenceCNN` shaped as the state dict suggests (channels, σ conditioning, embedding width)."""
    sigma_condition = "sigma_condition_precondition.0.weight" in sd
    s = 1 if sigma_condition else 0
    w_in = sd.get("encoder.0.weight")
    latent_channels = int(w_in.shape[1]) - s if isinstance(w_in, torch.Tensor) and w_in.dim() == 4 else 4
    w_out = sd.get("processing.3.weight")
    output_channels = int(w_out.shape[0]) if isinstance(w_out, torch.Tensor) and w_out.dim() == 4 else latent_channels
    w_sig = sd.get("sigma_condition_precondition.0.weight")
    time_embed_dim = int(w_sig.shape[1]) if isinstance(w_sig, torch.Tensor) and w_sig.dim() == 2 else 1280
    if latent_channels < 1 or output_channels < 1:
        latent_channels, output_channels = 4, 4
    return SiloReferenceCNN(
        latent_channels=latent_channels,
        output_channels=output_channels,
        sigma_condition=sigma_condition,
        time_embed_dim=time_embed_dim,
    )


def _check_keys(name: str, sd: Mapping[str, torch.Tensor], module: SiloReferenceCNN) -> None:
    """Refuse a state dict whose keys or shapes differ from ``module``'s, listing the missing, unexpected and wrongly
    shaped keys."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_describe_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes: {_describe_keys(wrong)}")
    hint = ""
    if any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in unexpected):
        hint = " (BatchNorm statistics found: the layer_norm=False variant is not supported)"
    raise ValueError(
        f"{name} does not match the SILO paper's CNN operator (DegradationModel, layer_norm=True, "
        f"{module.latent_channels} latent channels, sigma_condition={module.sigma_condition}){hint}: "
        + "; ".join(parts)
    )


def import_reference_operator(
    pt_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    degradation: dict,
    latent_format: dict,
    time_embedding: Mapping[str, torch.Tensor] | None = None,
    training: dict | None = None,
) -> Path:
    """Convert one of the paper's CNN operator ``.pt`` files into a comfyui-silo ``.safetensors`` operator.

    The ``.pt`` is read with ``torch.load(weights_only=True)`` (no pickle code runs) and checked key by key and
    shape by shape against :class:`SiloReferenceCNN`; any mismatch raises a ``ValueError`` listing the missing,
    unexpected and wrongly shaped keys. ``time_embedding`` (optional) is a state dict holding the diffusion UNet's
    timestep-embedding MLP (see :func:`extract_time_embedding`), needed to use a σ-conditioned operator.
    ``degradation`` / ``latent_format`` / ``training`` are stored as metadata (see :func:`.files.write_operator`).
    Returns the output path.
    """
    pt_path = Path(pt_path)
    if not pt_path.is_file():
        raise FileNotFoundError(f"reference operator file not found: {pt_path}")
    sd = _read_state_dict(pt_path)
    module = _module_for(sd)
    _check_keys(pt_path.name, sd, module)
    module.load_state_dict({k: v for k, v in sd.items()}, strict=True)
    if time_embedding is not None:
        module.attach_time_embedding(time_embedding)
    module.eval()

    info = {
        "source": "imported SILO paper reference operator (ronraphaeli/SILO DegradationModel)",
        "original_file": pt_path.name,
        "original_sha256": _file_sha256(pt_path),
        "time_embedding_attached": module.time_embed is not None,
    }
    if training:
        info.update(training)
    write_operator(out_path, module, degradation=degradation, latent_format=latent_format, training=info)
    return Path(out_path)
