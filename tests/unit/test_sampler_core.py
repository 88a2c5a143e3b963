"""The one guided loop (samplers/core.py): its shape rules, the Solver interface, progress, the non-finite guard."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from support.toy import ToyGaussianWorld, karras_sigmas, vp_sigmas

from comfyui_silo.samplers import (
    Guidance,
    NonFiniteStateError,
    ReSampleSettings,
    SiloSettings,
    Solver,
    guided_sample,
    sample_resample,
    sample_silo,
)
from comfyui_silo.samplers.core import MeasurementLoss

pytestmark = pytest.mark.unit

SAMPLERS = Path(__file__).resolve().parents[2] / "samplers"


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_in_samplers_is_longer_than_90_lines():
    long = {}
    for path in sorted(SAMPLERS.glob("*.py")):
        for fn in _functions(ast.parse(path.read_text())):
            n = fn.end_lineno - fn.lineno + 1
            if n > 90:
                long[f"{path.name}:{fn.name}"] = n
    assert not long, f"functions longer than 90 lines: {long}"


def test_no_sampler_module_imports_another_modules_private_names():
    offenders = []
    for path in sorted(SAMPLERS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "comfyui_silo" not in node.module:
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")
                              and not a.name.startswith("__")]
    assert not offenders


def test_each_helper_is_defined_once():
    names = {}
    for path in sorted(SAMPLERS.glob("*.py")):
        for fn in ast.parse(path.read_text()).body:
            if isinstance(fn, ast.FunctionDef):
                names.setdefault(fn.name, []).append(path.name)
    dup = {k: v for k, v in names.items() if len(v) > 1}
    assert not dup, dup


# ----------------------------------------------------------------------------------------- a new solver
class _ShrinkSolver(Solver):
    """A solver in a few lines: SILO's loss on the toy world, plus a post-step that records the steps it saw."""

    name = "Toy"
    key = "toy"

    def __init__(self, world, w):
        self._loss = MeasurementLoss("Toy", w, world.operator, "operator output shape {shape}")
        self.seen = []

    def loss(self, z0):
        return self._loss(z0)

    def report(self, i):
        return {"odd": i % 2 == 1}

    def post_step(self, state, x_next):
        self.seen.append(state.i)
        return x_next


def test_a_solver_is_a_small_object_and_the_loop_is_silos():
    world = ToyGaussianWorld(seed=0)
    g = torch.Generator().manual_seed(1)
    w = world.measure(world.sample_prior(1, g), g)
    sig = karras_sigmas(8)
    x = torch.randn(3, *world.shape, generator=g, dtype=torch.float64) * sig[0]
    solver, tr, cb = _ShrinkSolver(world, w), [], []
    out = guided_sample(world.exact_denoiser, x, sig, {"seed": 2}, cb.append, True, solver=solver,
                        guidance=Guidance.of(SiloSettings(eta=0.5, update="ddpm", grad_clamp=1.0)), trace=tr)
    ref = sample_silo(world.exact_denoiser, x, sig, {"seed": 2}, disable=True, measurement=w, operator=world.operator)
    assert torch.equal(out, ref)  # SILO is exactly this loop with its operator loss
    assert solver.seen == list(range(8))
    assert [t["odd"] for t in tr] == [i % 2 == 1 for i in range(8)]
    assert all({"toy_loss", "toy_eta", "toy_odd"} <= set(c) for c in cb)


# ----------------------------------------------------------------------------------------- progress
def test_progress_every_step_and_every_inner_iteration_and_cancel():
    world = ToyGaussianWorld(seed=0, operator="downsample")
    g = torch.Generator().manual_seed(1)
    w = world.measure(world.sample_prior(1, g), g)
    sig = vp_sigmas(9)
    x = torch.randn(2, *world.shape, generator=g, dtype=torch.float64) * sig[0]
    calls = []
    kw = dict(measurement=w, degradation=lambda im: world.operator(im), decoder=lambda z: z, disable=True,
              settings=ReSampleSettings(consistency_every=3, consistency_start=0, latent_steps=5, tolerance=0.0))
    sample_resample(world.exact_denoiser, x, sig, {"seed": 0}, progress=lambda *a: calls.append(a), **kw)
    steps = [c for c in calls if c[0] == "step"]
    assert steps == [("step", i + 1, 9) for i in range(9)]
    inner = [c for c in calls if c[0] == "consistency"]
    assert inner == [("consistency", k, 5) for k in range(1, 6)] * 3  # steps 0, 3, 6; 5 iterations each
    assert [c for c in calls if c[0] == "final consistency"] == [("final consistency", k, 5) for k in range(1, 6)]
    assert calls.index(("consistency", 1, 5)) < calls.index(("step", 1, 9))  # inside step 0, before it ends

    class Cancelled(Exception):
        pass

    def cancel(phase, done, total):
        if phase == "consistency" and done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample_resample(world.exact_denoiser, x, sig, {"seed": 0}, progress=cancel, **kw)


# ----------------------------------------------------------------------------------------- non-finite guard
def test_non_finite_state_or_estimate_raises_a_clear_error():
    world = ToyGaussianWorld(seed=0)
    g = torch.Generator().manual_seed(1)
    w = world.measure(world.sample_prior(1, g), g)
    sig = karras_sigmas(10)
    x = torch.randn(2, *world.shape, generator=g, dtype=torch.float64) * sig[0]

    def nan_at_4(xx, s, **kw):
        out = world.exact_denoiser(xx, s)
        return out * math.nan if abs(float(s[0]) - float(sig[4])) < 1e-12 else out

    with pytest.raises(NonFiniteStateError, match=r"SILO: the sampler denoised estimate became non-finite.*step 4") as e:
        sample_silo(nan_at_4, x, sig, None, disable=True, measurement=w, operator=world.operator, eta=0.0)
    assert e.value.step == 4 and e.value.sigma == pytest.approx(float(sig[4]))

    def steep(z):  # a loss term with a gradient of 1e308 per element: in VP units (x 14.6) it overflows
        return 1e308 * z.flatten(1).sum(1)

    with pytest.raises(NonFiniteStateError, match=r"SILO: the sampler state became non-finite.*step 0.*smaller eta"):
        sample_silo(world.exact_denoiser, x, sig, None, disable=True, measurement=w, operator=world.operator,
                    extra_loss=steep, settings=SiloSettings(eta=1.0, grad_clamp=None, gradient="x0"))
    # with the paper's clamp the same run stays finite
    out = sample_silo(world.exact_denoiser, x, sig, None, disable=True, measurement=w, operator=world.operator,
                      extra_loss=steep, settings=SiloSettings(eta=1.0, grad_clamp=1.0, gradient="x0"))
    assert torch.isfinite(out).all()
