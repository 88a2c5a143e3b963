"""The one guided-sampling loop every solver runs on (pure torch, ComfyUI ``KSAMPLER`` convention).

In the spirit of ComfyUI's ``generic_step_sampler``: the loop owns the sigmas, the noise, the update rule
(:mod:`.steps`), the noise parameterization (:mod:`.parameterization`), the eta schedule, the gradient clamp,
early stopping, the trace, the callback, progress reporting and a guard against non-finite states.  A *solver*
(:class:`Solver`) only says what its loss is (the gradient flows through whatever the loss calls: a latent
operator, the VAE decoder, ...) and, optionally, what happens after each step (ReSample's hard consistency and
resampling) and at the end.  SILO, Latent-DPS/PSLD and ReSample are small modules on top of it.

One step ``i`` (``sigma_i -> sigma_{i+1}``), with ``k(sigma)`` the parameterization's VP scale::

    z0_hat = model(x, sigma_i)
    g      = grad loss(z0_hat)  w.r.t. x (gradient="unet") or at z0_hat (gradient="x0"),  times k(sigma_i)
    x'     = update(x, z0_hat, sigma_i, sigma_{i+1}) - eta_i * clamp(g, -c, c) * k(sigma_{i+1})
    x      = solver.post_step(x')

``g`` is the gradient w.r.t. the papers' VP latent ``z_t = x / k``, and ``eta_i * clamp(g) * k(sigma_{i+1})`` is a
VP-space step mapped back to the state, so eta has the papers' meaning for every parameterization.
``eta_i = 0`` skips all gradient work; with ``eta = 0`` the loop is the plain ``update`` sampler, bit-exactly.

Only ``torch.autograd.grad`` w.r.t. the input is used (model parameters never get ``.grad``); guidance runs under
``torch.inference_mode(False)`` + ``torch.enable_grad()`` so it works inside ComfyUI's inference mode.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..config.fields import SettingError, Settings, setting
from .parameterization import Parameterization, get_parameterization
from .steps import UPDATES, make_noise_sampler

try:  # progress bar like ComfyUI's samplers; optional
    from tqdm.auto import trange as _trange
except ImportError:  # pragma: no cover - tqdm ships with ComfyUI
    _trange = None

__all__ = ["ETA_MODES", "ETA_SCHEDULES", "GRADIENT_MODES", "AutoState", "DivergenceWatch", "Guidance",
           "GuidanceDivergenceWarning", "GuidanceSettings", "MeasurementLoss", "Needs", "NonFiniteStateError", "Progress",
           "Solver", "StepState", "auto_eta", "auto_target", "batch_compatible", "divergence_text", "early_stop_field",
           "eta_field", "eta_function", "eta_mode_field", "eta_schedule_field", "grad_clamp_field", "gradient_field",
           "guided_sample", "normal_tensor", "partial_of", "per_batch_l2", "per_batch_mse", "require_callables",
           "resolve_settings", "split_options", "update_field"]

GRADIENT_MODES = ("unet", "x0")
ETA_MODES = ("fixed", "auto")
ETA_SCHEDULES = ("constant", "sigma")
#: ``progress(phase, done, total)``: called after every step (phase "step") and every inner iteration of a
#: solver's own optimisation (e.g. "consistency"); the node glue checks Cancel and advances its bar there.
Progress = Callable[[str, int, int], None]


class NonFiniteStateError(RuntimeError):
    """The sampler state or the denoised estimate became NaN/inf at ``step`` (noise level ``sigma``)."""

    def __init__(self, solver: str, step: int, sigma: float, what: str = "state"):
        self.solver, self.step, self.sigma, self.what = solver, step, sigma, what
        cause = ("the model returned NaN/inf" if what == "denoised estimate" else "the guidance step diverged")
        super().__init__(
            f"{solver}: the sampler {what} became non-finite (NaN/inf) at step {step} (sigma {sigma:.4g}): {cause}. "
            "Try a smaller eta (or a gradient clamp, the 'sigma' eta schedule, more steps), or run the model in a "
            "higher precision.")


# ------------------------------------------------------------------------------------------------ helpers
def normal_tensor(t):
    """Detach and, for inference tensors, clone into a normal tensor (call under inference_mode(False))."""
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.is_inference():
            t = t.clone()
    return t


def per_batch_l2(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``|| w_b - h_b ||_2`` over all non-batch dims -> shape [B]."""
    diff = w.to(device=h.device, dtype=h.dtype) - h
    return torch.linalg.vector_norm(diff.reshape(diff.shape[0], -1), ord=2, dim=1)


def per_batch_mse(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``mean((w_b - h_b)^2)`` over all non-batch dims -> shape [B]."""
    diff = w.to(device=h.device, dtype=h.dtype) - h
    return diff.reshape(diff.shape[0], -1).pow(2).mean(dim=1)


def require_callables(solver: str, **callables: tuple[Any, str, bool]) -> None:
    """Check a solver's callable arguments, given as ``name=(value, what it must be, optional)``: a missing required
    one gives "``<solver> needs <name>= (<what>)``", a non-callable one "``<name> must be [None or ]a callable <what>,
    got <type>``"."""
    for name, (value, what, optional) in callables.items():
        if value is None and not optional:
            raise ValueError(f"{solver} needs {name}= (a callable {what})")
        if value is not None and not callable(value):
            raise ValueError(f"{name} must be {'None or ' if optional else ''}a callable {what}, "
                             f"got {type(value).__name__}")


def batch_compatible(shape: tuple, ref: tuple) -> bool:
    """``shape == ref``, or ``shape`` is ``ref`` with batch 1 (broadcast over the batch)."""
    shape, ref = tuple(shape), tuple(ref)
    return shape == ref or (len(shape) == len(ref) >= 1 and shape[0] == 1 and shape[1:] == ref[1:])


class MeasurementLoss:
    """``z0 -> || y - forward(z0) ||`` per batch element (plain L2 norm, or the mean square with ``mse=True``).

    The first call checks that the measurement has ``forward``'s output shape (batch 1 broadcasts) and raises a
    ValueError naming ``solver`` and ``what`` otherwise (``what`` describes the output, ``{shape}`` standing for
    its shape: "operator output shape {shape} (operator applied to the denoised latent)").
    """

    def __init__(self, solver: str, measurement: torch.Tensor, forward: Callable, what: str, mse: bool = False):
        self.solver, self.forward, self.what, self.mse = solver, forward, what, mse
        with torch.inference_mode(False):
            self.y = normal_tensor(measurement)
        self.checked = False

    def __call__(self, z0: torch.Tensor) -> torch.Tensor:
        h = self.forward(z0)
        if not self.checked:
            self.check(h)
        return per_batch_mse(self.y, h) if self.mse else per_batch_l2(self.y, h)

    def check(self, h) -> None:
        o = tuple(h.shape) if isinstance(h, torch.Tensor) else None
        m = tuple(self.y.shape)
        if o is None or not batch_compatible(m, o):
            raise ValueError(f"{self.solver} measurement shape {m} does not match the {self.what.format(shape=o)}; "
                             f"the measurement must have that shape (batch {o[0] if o else '?'} or 1)")
        self.checked = True


# ------------------------------------------------------------------------------------------------ settings
# The fields every guided solver shares, declared once: a solver's settings class lists the ones it has, in the order
# of its node's widgets (saved workflows store widget values by position), with its own default or tooltip where
# the method differs.
EARLY_STOP_TOOLTIP = "-1: run to the end. k: return the denoised estimate at step k."


def eta_field(default: float, widget_max: float, tooltip: str) -> Any:
    """The guidance strength η (0 = plain sampling): any non-negative value in the Python API, the widget up to
    ``widget_max``."""
    return setting(default, min=0.0, widget_max=widget_max, step=0.05, tooltip=tooltip)


ETA_MODE_TOOLTIP = ("fixed: η is the step size (as before). auto: the step is set every step from the measurement's "
                    "noise floor (Polyak's step towards it); η is then the most it may use (0 = off).")


def eta_mode_field(tooltip: str = ETA_MODE_TOOLTIP) -> Any:
    """How η is used (:data:`ETA_MODES`); optional, after the node's other inputs (saved workflows keep 'fixed')."""
    return setting("fixed", choices=ETA_MODES, optional=True, tooltip=tooltip)


def update_field(tooltip: str = "ddpm: ancestral DDPM step (the papers). euler: deterministic DDIM step.") -> Any:
    """The loop's update rule (:data:`.steps.UPDATES`)."""
    return setting("ddpm", choices=tuple(UPDATES), tooltip=tooltip)


def gradient_field(tooltip: str) -> Any:
    """Where the gradient is taken (:data:`GRADIENT_MODES`)."""
    return setting("unet", choices=GRADIENT_MODES, tooltip=tooltip)


def grad_clamp_field(default: float | None, tooltip: str) -> Any:
    """The element-wise gradient clamp; 0 (None) = off."""
    return setting(default, none_as=0.0, min=0.0, max=100.0, step=0.1, tooltip=tooltip)


def early_stop_field(tooltip: str = EARLY_STOP_TOOLTIP) -> Any:
    """DiracDiffusion's early stop: return the denoised estimate at step k; -1 (None) = off."""
    return setting(None, none_as=-1, min=-1, max=10000, tooltip=tooltip)


def eta_schedule_field(tooltip: str = "constant, or sigma: η times the VP noise fraction relative to the first "
                                      "step's (decays to 0).") -> Any:
    """η over the steps (:data:`ETA_SCHEDULES`; a callable can be passed as an option, not declared)."""
    return setting("constant", choices=ETA_SCHEDULES, widget=False, tooltip=tooltip)


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a solver's runs need from the host, declared by its settings class (``NEEDS``): ``operator`` — the
    measurement's latent through a trained latent operator (``measurement=`` is ``w`` in the operator's output
    space, ``operator=`` is ``H``); otherwise the measurement's pixels ``y`` through the VAE decoder
    (``measurement=``, ``degradation=``, ``decoder=``, and ``encoder=`` when :meth:`GuidanceSettings.needs_encoder`)."""

    operator: bool = False


class GuidanceSettings(Settings):
    """Base of the solvers' settings: what the node glue asks of every solver, answered from its settings."""

    NEEDS: ClassVar[Needs] = Needs()

    def check_degradation(self, degradation) -> None:
        """Raise :class:`SettingError` (naming the field) when these settings cannot serve this degradation."""

    def unet_gradient(self) -> bool:
        """Does a run back-propagate through the denoiser (so its weights must be differentiable)?"""
        return getattr(self, "gradient", "unet") == "unet" and getattr(self, "eta", 0.0) > 0

    def needs_encoder(self) -> bool:
        """Does a run encode images back to latents (pixel-space solvers only)?"""
        return False

    def takes_noise_floor(self) -> bool:
        """Does the solver's function take ``noise_floor=`` (it declares :func:`eta_mode_field`)?"""
        return any(s.name == "eta_mode" for s in self.specs())


def resolve_settings(cls: type[GuidanceSettings], settings: GuidanceSettings | None, values: dict[str, Any]):
    """``settings`` (an instance of ``cls``, default ``cls()``) with ``values`` (widget / keyword values, ``none_as``
    meaning off) laid over it, validated once by the dataclass.  Unknown names are a :class:`SettingError`."""
    if settings is not None and not isinstance(settings, cls):
        raise SettingError("settings", f"settings= must be a {cls.__name__}, got {type(settings).__name__}")
    if not values:
        return settings if settings is not None else cls()
    base = settings.as_dict() if settings is not None else {}
    return cls.from_values({**base, **values})


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What the loop reads from a solver's settings (made by :meth:`of`; the settings have checked the values),
    and the model's noise parameterization."""

    eta: float
    update: str
    gradient: str
    grad_clamp: float | None
    early_stop: int | None
    eta_schedule: str | Callable[[int, float], float]
    param: Parameterization
    eta_mode: str = "fixed"
    noise_floor: Any = None
    partial_measurement: bool | None = None

    @classmethod
    def of(cls, settings: GuidanceSettings, parameterization: Parameterization | str = "vp",
           schedule: Callable[[int, float], float] | None = None, **fixed: Any) -> Guidance:
        """The fields of ``settings`` of the same name, ``fixed`` values for the ones a solver does not declare
        (ReSample's update), ``schedule`` (a callable ``eta_schedule`` option) and the parameterization."""
        names = [f.name for f in dataclasses.fields(cls)
                 if f.name not in ("param", "noise_floor", "partial_measurement")]
        values = {n: getattr(settings, n) for n in names if hasattr(settings, n)}
        if schedule is not None:
            values["eta_schedule"] = schedule
        values.setdefault("eta_schedule", "constant")
        values.setdefault("early_stop", None)
        values.setdefault("eta_mode", "fixed")
        return cls(**{**values, **fixed}, param=get_parameterization(parameterization))


def split_options(cls: type[GuidanceSettings], settings: GuidanceSettings | None, options: dict[str, Any]):
    """``(settings, schedule)``: the keyword ``options`` of a KSAMPLER function resolved against ``cls`` (see
    :func:`resolve_settings`); a callable ``eta_schedule`` (not a declared value) is returned aside, else None."""
    options = dict(options)
    schedule = options.pop("eta_schedule") if callable(options.get("eta_schedule")) else None
    return resolve_settings(cls, settings, options), schedule


def eta_function(eta: float, schedule, sigma0: float, param: Parameterization) -> Callable[[int, float], float]:
    """``(i, sigma) -> eta_i``: ``"constant"``; ``"sigma"`` = eta times the VP noise fraction ``sqrt(1 - abar)``
    relative to the first step's (decays to 0); or a callable ``(i, sigma) -> factor`` multiplying eta."""
    if callable(schedule):
        return lambda i, s: eta * float(schedule(i, s))
    if schedule == "constant":
        return lambda i, s: eta
    if schedule == "sigma":
        ref = param.noise_fraction(sigma0)
        if ref <= 0:
            return lambda i, s: 0.0
        return lambda i, s: eta * param.noise_fraction(s) / ref
    allowed = ", ".join(repr(k) for k in ETA_SCHEDULES)
    raise ValueError(f"eta_schedule={schedule!r} is not known; allowed values: {allowed}, or a callable (i, sigma)")


# ------------------------------------------------------------------------------------------------ solver
@dataclasses.dataclass
class StepState:
    """What a solver's :meth:`Solver.post_step` may use: the step, its levels, the model's estimate, the noise
    source, the parameterization, the trace entry (None without a trace) and the progress callable."""

    i: int
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    denoised: torch.Tensor
    noise_sampler: Callable | None
    param: Parameterization
    entry: dict | None
    progress: Progress | None


class Solver:
    """One guided method on the loop.  Override :meth:`loss`; the rest is optional.

    ``name`` names the solver in messages; the callback gets ``f"{key}_loss"``, ``f"{key}_eta"`` and every
    :meth:`report` field as ``f"{key}_{field}"``.
    """

    name = "solver"
    key = "solver"
    has_extra = False  # the loss has a second term (trace: "extra_loss")
    needs_noise = False  # post_step draws noise even with a deterministic update

    def loss(self, z0: torch.Tensor) -> torch.Tensor:
        """Per-batch measurement loss ``[B]`` of the denoised estimate; differentiable (the gradient flows through
        whatever it calls)."""
        raise NotImplementedError

    def extra(self, z0: torch.Tensor) -> torch.Tensor | None:
        """Optional second per-batch term added to :meth:`loss` before the gradient (reported as "extra_loss")."""
        return None

    def report(self, i: int) -> dict:
        """Fields known before step ``i`` runs, added to its trace entry and callback."""
        return {}

    def post_step(self, state: StepState, x_next: torch.Tensor) -> torch.Tensor:
        """The state after the guided update of step ``i`` (default: unchanged)."""
        return x_next

    def finish(self, x: torch.Tensor, entry: dict | None, progress: Progress | None) -> torch.Tensor:
        """The returned sample (default: the final state)."""
        return x

    def partial_measurement(self) -> bool | None:
        """Whether the measurement sees only part of the image (known after the first :meth:`loss`; None: the
        solver cannot tell). The automatic eta's target depends on it unless the caller says."""
        return None


def _checked_extra(extra, loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(extra, torch.Tensor) or tuple(extra.shape) != tuple(loss.shape):
        got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__
        raise ValueError(f"extra_loss must return a per-batch loss tensor of shape {tuple(loss.shape)}, got {got}")
    return extra.to(device=loss.device, dtype=loss.dtype)


# ------------------------------------------------------------------------------------------------ estimates
def _guided_estimate(model, x, sigma_in, extra_args, solver: Solver, gradient: str):
    """``(z0_hat, loss, extra, grad)`` with ``grad`` of ``sum_b loss_b (+ extra_b)`` w.r.t. ``x`` (through the model)
    or at ``z0_hat`` (``"x0"``), in the state's units; everything returned is detached."""
    extra = None
    if gradient == "x0":  # plain forward in the caller's mode (no graph, no copy of x)
        with torch.no_grad():
            denoised_ng = model(x, sigma_in, **extra_args)
    with torch.inference_mode(False), torch.enable_grad():
        if gradient == "unet":
            target = normal_tensor(x).requires_grad_(True)
            denoised_g = model(target, normal_tensor(sigma_in), **extra_args)
        else:
            denoised_g = target = normal_tensor(denoised_ng).requires_grad_(True)
            del denoised_ng
        loss = solver.loss(denoised_g)
        total = loss
        if solver.has_extra:
            extra = _checked_extra(solver.extra(denoised_g), loss)
            total = loss + extra
            extra = extra.detach()
        (grad,) = torch.autograd.grad(total.sum(), target)
    return denoised_g.detach(), loss.detach(), extra, grad


def _plain_estimate(model, x, sigma_in, extra_args, solver: Solver, need_loss: bool, need_extra: bool):
    """An unguided model evaluation ``(z0_hat, loss or None, extra or None)``; no graph."""
    with torch.no_grad():
        denoised = model(x, sigma_in, **extra_args)
        loss = solver.loss(denoised) if need_loss or need_extra else None
        extra = _checked_extra(solver.extra(denoised), loss) if need_extra else None
    return denoised, loss, extra


def _check_finite(t: torch.Tensor, solver: Solver, i: int, sigma: float, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteStateError(solver.name, i, sigma, what)


def _mean(eta_i) -> float:
    return float(eta_i.float().mean()) if isinstance(eta_i, torch.Tensor) else float(eta_i)


def _report(trace, callback, solver: Solver, i, x, sigma, denoised, loss, extra, eta_i, g) -> dict | None:
    """Append step ``i``'s trace entry (returned) and call the callback."""
    fields = solver.report(i)
    entry = None
    if trace is not None:
        norms = [] if g is None else torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).float().cpu().tolist()
        entry = {"step": i, "sigma": float(sigma), "eta": _mean(eta_i), "loss": loss.float().cpu().tolist(),
                 "grad_norm": norms}
        if solver.has_extra:
            entry["extra_loss"] = extra.float().cpu().tolist()
        entry.update(fields)
        trace.append(entry)
    if callback is not None:
        info = {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised,
                f"{solver.key}_loss": loss, f"{solver.key}_eta": _mean(eta_i)}
        info.update({f"{solver.key}_{k}": v for k, v in fields.items()})
        callback(info)
    return entry


# ------------------------------------------------------------------------------------------------ automatic eta
#: The automatic rule's target for the consistency trace at VE noise level ``s`` (how these were found:
#: docs/automatic-eta.md), half the noise floor at the end either way:
#: - a measurement of the whole image (blur, JPEG): ``floor * sqrt(AUTO_END**2 + (AUTO_SLOPE * s)**2)``, loose
#:   while the estimate is still blurry;
#: - a partial measurement (super-resolution, inpainting: part of the image is not measured at all):
#:   ``sqrt((AUTO_END * floor)**2 + (r0**2 - floor**2)+ * (s**2 / (1 + s**2))**AUTO_PARTIAL_POWER)``, down from the
#:   first step's residual ``r0`` (the prior's) the way an exact posterior sampler's expected residual comes down.
AUTO_END = 0.5
AUTO_SLOPE = 1.0
AUTO_PARTIAL_POWER = 2.0


def auto_target(floor: torch.Tensor, param: Parameterization, sigma: float,
                first: torch.Tensor | None = None) -> torch.Tensor:
    """The consistency the automatic rule steers towards at this level (``[B]``; inf where the state is noise).
    ``first``: the first step's loss ``[B]`` for a partial measurement (None: a measurement of the whole image)."""
    s = param.ve_sigma(sigma)
    if first is not None:
        share = 1.0 if not math.isfinite(s) else (s * s / (1.0 + s * s)) ** AUTO_PARTIAL_POWER
        first = first.to(floor)
        return ((AUTO_END * floor) ** 2 + (first ** 2 - floor ** 2).clamp(min=0) * share).sqrt()
    if not math.isfinite(s):
        return torch.full_like(floor, math.inf)
    return floor * math.sqrt(AUTO_END ** 2 + (AUTO_SLOPE * s) ** 2)


def auto_eta(loss: torch.Tensor, g: torch.Tensor, target: torch.Tensor, ceiling: float) -> torch.Tensor:
    """Per-batch eta ``[B]`` of the automatic rule: Polyak's step size ``(loss - target)+ / ||g||^2`` — the step
    that would bring the loss down to the target to first order, none once it is there — at most ``ceiling``.

    ``g`` is the loss's gradient in VP units (what the update subtracts), so the step ``eta * g`` changes the loss
    by ``-eta ||g||^2`` to first order."""
    dt = g.dtype
    sq = g.reshape(g.shape[0], -1).pow(2).sum(1)
    excess = (loss.to(dt) - target.to(dt)).clamp(min=0)
    eta = torch.where(sq > 0, excess / sq.clamp(min=torch.finfo(dt).tiny), torch.zeros_like(sq))
    return eta.clamp(max=ceiling)


def _scaled(eta_i, g: torch.Tensor) -> torch.Tensor:
    if isinstance(eta_i, torch.Tensor):
        return eta_i.reshape(-1, *([1] * (g.dim() - 1))).to(g) * g
    return eta_i * g


# ------------------------------------------------------------------------------------------------ the loop
def _prepare(guidance: Guidance, sigmas, solver: Solver):
    """The parameterization, update rule, eta function and step count (the settings are validated already; only
    what depends on the sigmas is checked here)."""
    n_steps = len(sigmas) - 1
    k = guidance.early_stop
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_steps):
        raise ValueError(f"{solver.name}: early_stop={k!r} is out of range for {n_steps} steps (0..{n_steps - 1})")
    param = guidance.param
    step_fn = param.update(guidance.update)
    eta_fn = eta_function(float(guidance.eta), guidance.eta_schedule, float(sigmas[0]) if len(sigmas) else 0.0, param)
    return param, step_fn, eta_fn, n_steps


class DivergenceWatch:
    """Flags a run whose consistency climbs far above its best: the mean loss ``DIVERGENCE_FACTOR`` times above both
    its minimum so far and the noise floor (when known).  :meth:`see` returns the report once (then None)."""

    FACTOR = 10.0

    def __init__(self, solver: str, floor: torch.Tensor | None):
        self.solver = solver
        self.floor = float(floor.float().mean()) if floor is not None else 0.0
        self.best, self.best_step, self.flagged = math.inf, -1, False

    def see(self, i: int, sigma: float, loss: torch.Tensor) -> dict | None:
        value = float(loss.float().mean())
        if not math.isfinite(value) or self.flagged:
            return None
        if value < self.best:
            self.best, self.best_step = value, i
            return None
        if value <= self.FACTOR * max(self.best, self.floor):
            return None
        self.flagged = True
        report = {"step": i, "sigma": sigma, "loss": value, "best": self.best, "best_step": self.best_step}
        warnings.warn(divergence_text(report, self.solver), GuidanceDivergenceWarning, stacklevel=3)
        return report


class GuidanceDivergenceWarning(UserWarning):
    """A guided run's consistency climbed far above its best (see :class:`DivergenceWatch`)."""


def divergence_text(report: dict, solver: str = "") -> str:
    """What a divergence report says to the user: where, how far, and what to change."""
    return (f"{solver + ': ' if solver else ''}the guidance diverged at step {report['step']} (sigma {report['sigma']:.4g}): the consistency "
            f"rose to {report['loss']:.4g}, {report['loss'] / max(report['best'], 1e-30):.0f}× its best "
            f"({report['best']:.4g} at step {report['best_step']}); the result is likely washed out. Use eta_mode "
            "'auto', a smaller eta or a gradient clamp (grad_clamp 1).")


def _auto_floor(guidance: Guidance, solver: Solver, x: torch.Tensor) -> torch.Tensor | None:
    """The noise floor as a ``[B]`` tensor (None when not given); 'auto' needs one."""
    floor = guidance.noise_floor
    if floor is None:
        if guidance.eta_mode == "auto":
            raise ValueError(f"{solver.name}: eta_mode='auto' needs noise_floor= (the consistency loss expected at the "
                             "true image, e.g. sigma_y * sqrt(measurement size) for pixel noise sigma_y)")
        return None
    floor = torch.as_tensor(floor, dtype=torch.float64).reshape(-1).detach().cpu()
    if floor.numel() not in (1, x.shape[0]) or not bool(torch.isfinite(floor).all()) or bool((floor < 0).any()):
        raise ValueError(f"{solver.name}: noise_floor must be one finite value >= 0 or one per batch element "
                         f"({x.shape[0]}), got {floor.tolist()}")
    return floor.expand(x.shape[0]).clone()


def partial_of(degradation, y: torch.Tensor | None = None, image_values: int | None = None) -> bool | None:
    """Whether a pixel-space measurement is partial: the degradation's ``is_partial`` when it has one, else whether
    ``y`` holds fewer values per image than the decoded image (``image_values``); None when unknown."""
    flag = getattr(degradation, "is_partial", None)
    if isinstance(flag, bool):
        return flag
    if y is not None and image_values:
        return y[0].numel() < image_values
    return None


class AutoState:
    """What the automatic eta keeps over one run: the noise floor ``[B]``, whether the measurement is partial
    (the caller's word, else the solver's after its first loss) and, then, the first guided step's loss."""

    def __init__(self, floor: torch.Tensor | None, partial: bool | None):
        self.floor, self.partial, self.first = floor, partial, None

    def target(self, loss: torch.Tensor, solver: Solver, param: Parameterization, sigma: float) -> torch.Tensor:
        if self.partial is None:
            self.partial = bool(solver.partial_measurement())
        if self.partial and self.first is None:
            self.first = loss.detach().clone()
        return auto_target(self.floor.to(loss.device, loss.dtype), param, sigma,
                           self.first if self.partial else None)


def _guided_step(model, x, sigma, sigma_next, s_in, extra_args, solver, guidance, param, eta_i, auto):
    """One guided evaluation: ``(z0_hat, loss, extra, g in VP units, eta_i, target)`` (``eta_i`` a ``[B]`` tensor
    and ``target`` the rule's consistency target in 'auto' mode, else unchanged and None)."""
    denoised, loss, extra, g = _guided_estimate(model, x, sigma * s_in, extra_args, solver, guidance.gradient)
    target = None
    with torch.no_grad():
        g = g.to(x.dtype) * param.vp_scale(sigma)  # gradient w.r.t. the VP latent (x0: Jacobian factor 1)
        if guidance.eta_mode == "auto":
            target = auto.target(loss, solver, param, float(sigma))
            eta_i = auto_eta(loss, g, target, eta_i)
    return denoised, loss, extra, g, eta_i, target


def _guided_update(x_next, g, eta_i, clamp, k_next):
    """``x_next - eta_i * clamp(g) * k(sigma_next)`` (the fixed-eta arithmetic unchanged, bit for bit)."""
    g = g.clamp(-clamp, clamp) if clamp is not None else g
    if isinstance(eta_i, torch.Tensor):  # automatic: one eta per batch element
        return x_next - k_next * _scaled(eta_i, g)
    return x_next - (eta_i * k_next) * g


def guided_sample(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
                  disable=None, *, solver: Solver, guidance: Guidance, trace: list | None = None,
                  noise_sampler=None, progress: Progress | None = None) -> torch.Tensor:
    """Run ``solver`` on the guided loop (see the module docstring); returns the sample, or ``z0_hat`` of step
    ``guidance.early_stop``.

    ``model(x, sigma_vec, **extra_args) -> z0_hat`` (``extra_args["seed"]`` seeds the noise like ComfyUI);
    ``callback`` gets ComfyUI's per-step dict plus the solver's fields; ``trace`` receives one dict per step
    ``{"step", "sigma", "eta" (the batch mean in 'auto'), "loss": [B], "grad_norm": [B] (empty when unguided),
    ...solver fields}``, with ``"floor"`` when a noise floor is known, ``"target"`` in 'auto' mode and
    ``"diverged"`` (a :class:`DivergenceWatch` report, also a :class:`GuidanceDivergenceWarning`) on the step where
    the consistency ran away; ``noise_sampler(sigma, sigma_next)`` replaces ComfyUI's seeded noise;
    ``progress(phase, done, total)`` is called after each step and by the solver's inner loops.  Raises
    :class:`NonFiniteStateError` on NaN/inf.
    """
    extra_args = {} if extra_args is None else extra_args
    param, step_fn, eta_fn, n_steps = _prepare(guidance, sigmas, solver)
    eta, clamp, early_stop = float(guidance.eta), guidance.grad_clamp, guidance.early_stop
    floor = _auto_floor(guidance, solver, x)
    auto = AutoState(floor, guidance.partial_measurement)
    if n_steps < 1:
        return x
    if noise_sampler is None and (param.stochastic(guidance.update) or solver.needs_noise):
        noise_sampler = make_noise_sampler(x, seed=extra_args.get("seed", None))
    s_in, entry, watch = x.new_ones([x.shape[0]]), None, DivergenceWatch(solver.name, floor)
    for i in _trange(n_steps, disable=disable) if _trange is not None else range(n_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eta_i = 0.0 if eta == 0 else eta_fn(i, float(sigma))
        g = extra = target = None
        if eta_i != 0 and early_stop != i:
            denoised, loss, extra, g, eta_i, target = _guided_step(model, x, sigma, sigma_next, s_in, extra_args,
                                                                   solver, guidance, param, eta_i, auto)
        else:
            eta_i = 0.0
            report = trace is not None or callback is not None
            denoised, loss, extra = _plain_estimate(model, x, sigma * s_in, extra_args, solver, report or i == 0,
                                                    solver.has_extra and trace is not None)
        _check_finite(denoised, solver, i, float(sigma), "denoised estimate")
        entry = _report(trace, callback, solver, i, x, sigma, denoised, loss, extra, eta_i, g)
        _annotate(entry, floor, target, watch.see(i, float(sigma), loss) if g is not None else None)
        if early_stop == i:
            return denoised
        with torch.no_grad():
            x_next = step_fn(x, denoised, sigma, sigma_next, noise_sampler)
            if g is not None:
                x_next = _guided_update(x_next, g, eta_i, clamp, param.vp_scale(sigma_next))
        x_next = solver.post_step(StepState(i, sigma, sigma_next, denoised, noise_sampler, param, entry, progress),
                                  x_next)
        _check_finite(x_next, solver, i, float(sigma), "state")
        x = x_next
        if progress is not None:
            progress("step", i + 1, n_steps)
    return solver.finish(x, entry, progress)


def _annotate(entry: dict | None, floor, target, diverged: dict | None) -> None:
    """Add the floor, the automatic rule's target and a divergence report to a step's trace entry."""
    if entry is None:
        return
    if floor is not None:
        entry["floor"] = floor.float().tolist()
    if target is not None:
        entry["target"] = target.float().cpu().tolist()
    if diverged is not None:
        entry["diverged"] = diverged
