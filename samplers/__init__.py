"""Pure-torch samplers in ComfyUI's KSAMPLER convention; never imports ComfyUI.

Layout: :mod:`.core` is the one guided loop (sigmas, noise, update rule, eta schedule, clamp, early stop, trace,
callbacks, progress, non-finite guard) and the :class:`~.core.Solver` interface; :mod:`.steps` the update rules;
:mod:`.parameterization` the vp / flow state and its VP units; :mod:`.silo`, :mod:`.latent_dps` and
:mod:`.resample` (with :mod:`.consistency`) are the solvers, each with its settings dataclass.
"""

from .consistency import hard_consistency
from .core import Guidance, GuidanceSettings, NonFiniteStateError, Solver, StepState, guided_sample
from .latent_dps import LatentDPSSettings, psld_gluing_loss, sample_latent_dps
from .parameterization import PARAMETERIZATIONS, get_parameterization
from .resample import ReSampleSettings, sample_resample, stochastic_resample
from .silo import SiloSettings, sample_silo
from .steps import UPDATES, ddpm_step, euler_step, flow_ddpm_step, make_noise_sampler

__all__ = ["PARAMETERIZATIONS", "UPDATES", "Guidance", "GuidanceSettings", "LatentDPSSettings", "NonFiniteStateError",
           "ReSampleSettings", "SiloSettings", "Solver", "StepState", "ddpm_step", "euler_step", "flow_ddpm_step",
           "get_parameterization", "guided_sample", "hard_consistency", "make_noise_sampler", "psld_gluing_loss",
           "sample_latent_dps", "sample_resample", "sample_silo", "stochastic_resample"]
