"""A small batch to try ``batch`` on without real weights: what the batch test tier and ``benchmarks/batch.py`` run.

A throw-away ComfyUI base directory holding the random-weight SD1.5 checkpoint (``random_checkpoint.py``'s
``small`` variant, built once and cached) and an untrained operator under the name the shipped deblurring workflow
loads, plus a folder of smooth synthetic photos. The restorations are meaningless (random weights); the plumbing,
the timings of the plumbing and the determinism are what they are for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .host_harness import REPO_ROOT, ensure_checkpoint, make_base_directory
from .random_checkpoint import SD15_LATENT_FORMAT

WORKFLOW = REPO_ROOT / "workflows" / "silo_gaussian_deblur.json"
OPERATOR_NAME = "gaussian_blur_sd15.safetensors"  # what the workflow's Latent Degradation Operator loads


@dataclass(frozen=True)
class BatchDemo:
    """Where the demo lives and the ``batch`` arguments that run it (besides ``--inputs`` and ``--out``)."""

    base: Path
    photos: Path
    workflow: Path
    sets: tuple[str, ...]

    def args(self, steps: int = 2) -> list[str]:
        """``--base-directory``, ``--cpu`` and the ``--set`` overrides: the small checkpoint, ``steps`` SILO steps,
        the gradient at x̂₀ (no backward pass through the UNet)."""
        out = ["--base-directory", str(self.base), "--cpu"]
        for item in (*self.sets, f"SILOKSampler.steps={steps}"):
            out += ["--set", item]
        return out


def write_photo(path: Path, seed: int, size: int = 64) -> Path:
    """A smooth random RGB picture (bilinear upsampling of a 16x16 noise image), the same for the same seed."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(size, size), mode="bilinear",
                                          align_corners=False)[0]
    arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)
    return path


def make_batch_demo(folder: Path, photos: int = 6, size: int = 64) -> BatchDemo:
    """Build (or reuse) the demo under ``folder``: ``base/`` for ComfyUI, ``photos/p0.png`` ... for the batch."""
    from ..operators.degradations import STANDARD_DEGRADATIONS
    from ..operators.io import save_operator
    from ..operators.network import LatentOperator

    checkpoint = ensure_checkpoint("small")
    base = make_base_directory(Path(folder) / "base", [checkpoint])
    operator = base / "models" / "latent_operators" / OPERATOR_NAME
    if not operator.exists():
        save_operator(operator, LatentOperator(latent_channels=4, width=8),
                      degradation=dict(STANDARD_DEGRADATIONS["gaussian_blur"]), latent_format=dict(SD15_LATENT_FORMAT))
    folder_photos = Path(folder) / "photos"
    for i in range(photos):
        if not (folder_photos / f"p{i}.png").exists():
            write_photo(folder_photos / f"p{i}.png", seed=i, size=size)
    sets = (f"CheckpointLoaderSimple.ckpt_name={checkpoint.name}", "SILOKSampler.gradient=x0")
    return BatchDemo(base, folder_photos, WORKFLOW, sets)
