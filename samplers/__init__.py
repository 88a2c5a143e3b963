"""Pure-torch samplers in ComfyUI's KSAMPLER convention; never imports ComfyUI."""

from .latent_dps import LATENT_DPS_OPTIONS, psld_gluing_loss, sample_latent_dps
from .resample import RESAMPLE_OPTIONS, sample_resample, stochastic_resample
from .silo import SILO_OPTIONS, sample_silo
from .steps import UPDATES, ddpm_step, euler_step, make_noise_sampler

__all__ = ["LATENT_DPS_OPTIONS", "RESAMPLE_OPTIONS", "SILO_OPTIONS", "UPDATES", "ddpm_step", "euler_step",
           "make_noise_sampler", "psld_gluing_loss", "sample_latent_dps", "sample_resample", "sample_silo",
           "stochastic_resample"]
