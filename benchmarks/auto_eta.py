"""Automatic η against every fixed η, in the pack's exact-posterior Gaussian worlds (pure torch, CPU, float64).

For each world (SILO: :class:`ToyGaussianWorld`'s ill-conditioned blur in the latent; Latent-DPS:
:class:`PixelToyWorld`'s linear decoder and orthonormal 2×2 downsample in pixel space), parameterization (vp, flow),
step count (50, 250, 999) and measurement noise (σ_y 0.01, 0.05): the posterior-mean error ``‖mean of B samples −
E[z0 | w]‖`` of every fixed η of the ×2 sweep 0.125 … 64 and of ``eta_mode="auto"`` (ceiling 1000, i.e. none), with
the same starting noise and sampler noise for all. Prints a markdown table: best fixed η, its error, auto's error and
the ratio (auto / best; the issue asks for ≤ 1.15), auto's final residual in units of the noise floor.

    python -m benchmarks.auto_eta                       # all 24 rows (SILO and Latent-DPS), ~10 min on 2 cores
    python -m benchmarks.auto_eta --solver silo --steps 50 250
    python -m benchmarks.auto_eta --end-to-end           # SILO with a trained operator: decoded PSNR, 50/250 steps

End to end (:class:`TrainedOperatorWorld`): an exact Gaussian prior on a 4×8×8 latent, a linear "VAE" (a 1×1 channel
mix and a ×4 bilinear upsampling to a 3×32×32 image, its pseudo-inverse as the encoder), a 9×9 σ 2 Gaussian blur plus
noise in pixel space, and the pack's LatentOperator trained on fresh pairs ``(E(x), E(A(x) + n))`` of the prior's
images; the noise floor as the nodes estimate it (the photo encoded once more under fresh noise, plus the operator's
held-out error). The decoded PSNR of every sample against the true image, averaged, for the fixed-η sweep and auto.

``tests/unit/test_auto_eta.py`` runs the SILO rows and asserts the ratio.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.toy import PixelToyWorld, ToyGaussianWorld, flow_sigmas, vp_sigmas  # noqa: E402

from comfyui_silo.samplers.latent_dps import sample_latent_dps  # noqa: E402
from comfyui_silo.samplers.silo import sample_silo  # noqa: E402

FIXED_ETAS = tuple(0.125 * 2 ** k for k in range(10))  # 0.125 ... 64
SETTINGS = tuple((p, n, s) for p in ("vp", "flow") for n in (50, 250, 999) for s in (0.01, 0.05))
BATCH = 256


@dataclass
class Row:
    solver: str
    param: str
    steps: int
    sigma_y: float
    fixed: dict  # eta -> posterior-mean error
    auto: float
    auto_residual: float  # final mean residual / noise floor

    @property
    def best_eta(self) -> float:
        return min(self.fixed, key=self.fixed.get)

    @property
    def ratio(self) -> float:
        return self.auto / self.fixed[self.best_eta]


def _world(solver: str, sigma_y: float):
    """``(run(x, sigmas, param, **options) -> samples, posterior mean, residual(samples) -> [B], floor)``."""
    if solver == "silo":
        world = ToyGaussianWorld(seed=0, operator="blur", sigma_w=sigma_y)
        g = torch.Generator().manual_seed(1)
        w = world.measure(world.sample_prior(1, g), g)

        def run(x, sig, param, **kw):
            return sample_silo(world.denoiser(param), x, sig, {"seed": 3}, disable=True, measurement=w,
                               operator=world.operator, parameterization=param, noise_floor=world.noise_floor(), **kw)
        return run, world.posterior_mean(w)[0], lambda z: (w - world.operator(z)).flatten(1).norm(dim=1), \
            world.noise_floor()
    toy = PixelToyWorld(0, sigma_y=sigma_y)
    y = toy.measure(toy.down)
    floor = toy.noise_floor(toy.down)

    def run(x, sig, param, **kw):
        return sample_latent_dps(toy.world.denoiser(param), x, sig, {"seed": 3}, disable=True, measurement=y,
                                 degradation=toy.down, decoder=toy.dec, parameterization=param, noise_floor=floor, **kw)
    return run, toy.posterior_mean(toy.down, y), lambda z: (y - toy.down(toy.dec(z))).flatten(1).norm(dim=1), floor


def measure(solver: str, param: str, steps: int, sigma_y: float, batch: int = BATCH) -> Row:
    """One row: every fixed η of the sweep and auto, same noise for all."""
    run, pm, residual, floor = _world(solver, sigma_y)
    sig = vp_sigmas(steps) if param == "vp" else flow_sigmas(steps)
    x = torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x * sig[0] if param == "vp" else x  # flow starts at sigma = 1: the state is the noise

    def err(out):
        return float((out.mean(0) - pm.reshape(out.shape[1:])).norm())

    with warnings.catch_warnings():  # the large fixed η of the sweep diverge on purpose
        warnings.simplefilter("ignore")
        fixed = {eta: err(run(x, sig, param, eta=eta)) for eta in FIXED_ETAS}
    out = run(x, sig, param, eta=1000.0, eta_mode="auto")
    return Row(solver, param, steps, sigma_y, fixed, err(out), float(residual(out).mean()) / floor)


class TrainedOperatorWorld:
    """SILO end to end with a trained operator and an exact prior (see the module docstring)."""

    def __init__(self, sigma_y: float = 0.01, seed: int = 0, train_steps: int = 600):
        import torch.nn.functional as F

        from comfyui_silo.operators.degradations import GaussianBlur
        from comfyui_silo.operators.network import LatentOperator

        self.sigma_y, self.F = float(sigma_y), F
        self.world = ToyGaussianWorld(shape=(4, 8, 8), seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        self.mix = torch.randn(3, 4, generator=g, dtype=torch.float64) / 2
        basis = torch.eye(256, dtype=torch.float64).reshape(256, 4, 8, 8)
        self.Dm = self.decode(basis, shift=0.0).reshape(256, -1).T  # [3072, 256]
        self.Em = torch.linalg.pinv(self.Dm)
        self.blur = GaussianBlur(kernel_size=9, sigma=2.0)
        torch.manual_seed(seed)
        self.operator = LatentOperator(latent_channels=4, width=16)
        self.mse = self._train(train_steps, g)

    def decode(self, z, shift: float = 0.5):
        img = torch.einsum("ck,bkhw->bchw", self.mix.to(z.dtype), z)
        return self.F.interpolate(img, scale_factor=4, mode="bilinear", align_corners=False) + shift

    def encode(self, img):
        return ((img - 0.5).reshape(img.shape[0], -1) @ self.Em.T.to(img.dtype)).reshape(img.shape[0], 4, 8, 8)

    def measure(self, x, g):
        y = self.blur(x.float()).double()
        return y + self.sigma_y * torch.randn(y.shape, generator=g, dtype=y.dtype)

    def H(self, z):
        return self.operator(z.float(), sigma_y=self.sigma_y).double()

    def _train(self, steps: int, g) -> float:
        opt = torch.optim.Adam(self.operator.parameters(), lr=2e-3)
        for _ in range(steps):
            z = self.world.sample_prior(32, g)
            target = self.encode(self.measure(self.decode(z), g))
            loss = (self.operator(z.float(), sigma_y=self.sigma_y) - target.float()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.operator.eval().requires_grad_(False)
        z = self.world.sample_prior(64, g)  # held out, noiseless targets (as the pack's training reports them)
        with torch.no_grad():
            return float((self.H(z) - self.encode(self.blur(self.decode(z).float()).double())).pow(2).mean())


def measure_end_to_end(world: TrainedOperatorWorld, steps: int, batch: int = 8) -> dict:
    """Decoded PSNR (mean over the samples) of every fixed η of the sweep and of auto, on one photo."""
    g = torch.Generator().manual_seed(1)
    z_star = world.world.sample_prior(1, g)
    x_star = world.decode(z_star)
    y = world.measure(x_star, g)
    w = world.encode(y)
    jitter = world.encode(y + world.sigma_y * torch.randn(y.shape, generator=g, dtype=y.dtype))
    floor = math.sqrt(float((jitter - w).pow(2).sum()) + world.mse * w[0].numel())
    sig = vp_sigmas(steps)
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]

    def psnr(**kw) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = sample_silo(world.world, x, sig, {"seed": 3}, disable=True, measurement=w, operator=world.H,
                              noise_floor=floor, **kw)
        mse = (world.decode(out) - x_star).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        return float((-10 * mse.log10()).mean())

    fixed = {eta: psnr(eta=eta) for eta in FIXED_ETAS}
    return {"steps": steps, "fixed": fixed, "auto": psnr(eta=1000.0, eta_mode="auto"), "floor": floor,
            "operator_mse": world.mse}


def table(rows: list[Row]) -> str:
    lines = ["| solver | param | steps | σ_y | best fixed η | its error | auto error | auto / best | auto residual / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.solver} | {r.param} | {r.steps} | {r.sigma_y} | {r.best_eta:g} | "
                     f"{r.fixed[r.best_eta]:.3f} | {r.auto:.3f} | {r.ratio:.2f} | {r.auto_residual:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--solver", nargs="+", choices=["silo", "latent_dps"], default=["silo", "latent_dps"])
    p.add_argument("--steps", nargs="+", type=int, default=[50, 250, 999])
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--end-to-end", action="store_true", help="SILO with a trained operator: decoded PSNR")
    args = p.parse_args(argv)
    rows, t0 = [], time.time()
    if args.end_to_end:
        world = TrainedOperatorWorld()
        print("| steps | best fixed η | its PSNR (dB) | auto PSNR (dB) | auto − best (dB) |\n|---|---|---|---|---|")
        for steps in args.steps:
            if steps == 999:
                continue
            r = measure_end_to_end(world, steps)
            best = max(r["fixed"], key=r["fixed"].get)
            print(f"| {steps} | {best:g} | {r['fixed'][best]:.2f} | {r['auto']:.2f} | {r['auto'] - r['fixed'][best]:+.2f} |",
                  flush=True)
        print(f"\noperator held-out MSE {world.mse:.3g}; {time.time() - t0:.0f} s")
        return 0
    for solver in args.solver:
        for param, steps, sigma_y in SETTINGS:
            if steps in args.steps:
                rows.append(measure(solver, param, steps, sigma_y, args.batch))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n{len(rows)} rows in {time.time() - t0:.0f} s; torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
