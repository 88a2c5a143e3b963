"""Pure-torch samplers in ComfyUI's KSAMPLER convention; never imports ComfyUI."""

from .silo import SILO_OPTIONS, sample_silo
from .steps import UPDATES, ddpm_step, euler_step, make_noise_sampler

__all__ = ["SILO_OPTIONS", "UPDATES", "ddpm_step", "euler_step", "make_noise_sampler", "sample_silo"]
