"""In-process tier: the pure-torch guided loop at eta = 0 against the host's own k-diffusion samplers, bit for bit.

vp: ComfyUI's ``sample_euler`` and ``sample_ddpm``; flow: ``sample_euler``, which ComfyUI runs unchanged for flow
(CONST) models, on the host's own flow schedule (``ModelSamplingDiscreteFlow``, SD3's shift 3, "simple").  ComfyUI has
no DDPM sampler for flow models (its ``ddpm`` assumes the vp state), so the flow "ddpm" update has no host twin.
"""

from __future__ import annotations

import pytest
import torch
from support.toy import ToyGaussianWorld, karras_sigmas

from comfyui_silo.samplers import sample_latent_dps, sample_resample, sample_silo

pytestmark = pytest.mark.comfy


def _flow_sigmas(steps: int) -> torch.Tensor:
    import comfy.model_sampling
    import comfy.samplers

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = FlowSampling()
    ms.set_parameters(shift=3.0, multiplier=1000)
    return comfy.samplers.calculate_sigmas(ms, "simple", steps).float()


@pytest.mark.parametrize(("parameterization", "update"), [("vp", "euler"), ("vp", "ddpm"), ("flow", "euler")])
def test_eta0_is_the_hosts_sampler_bit_exactly(comfy_host, parameterization, update):
    from comfy.k_diffusion import sampling as host

    world = ToyGaussianWorld(seed=3)
    model = world.denoiser(parameterization)
    sigmas = _flow_sigmas(12) if parameterization == "flow" else karras_sigmas(12, dtype=torch.float32)
    if parameterization == "flow":
        assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    x = torch.randn(3, *world.shape, generator=torch.Generator().manual_seed(11)) * sigmas[0]
    host_fn = {"euler": host.sample_euler, "ddpm": host.sample_ddpm}[update]
    host_den, our_den = [], []
    ref = host_fn(model, x, sigmas, extra_args={"seed": 7}, callback=lambda d: host_den.append(d["denoised"]),
                  disable=True)
    w = world.operator(torch.zeros(1, *world.shape))
    ours = sample_silo(model, x, sigmas, {"seed": 7}, callback=lambda d: our_den.append(d["denoised"]), disable=True,
                       measurement=w, operator=world.operator, eta=0.0, update=update,
                       parameterization=parameterization)
    assert torch.equal(ours, ref)
    assert len(host_den) == 12 and all(torch.equal(a, b) for a, b in zip(host_den, our_den, strict=True))
    # the baselines run on the same loop: with their guidance off they are the host's sampler as well
    dps = sample_latent_dps(model, x, sigmas, {"seed": 7}, disable=True, measurement=w, degradation=world.operator,
                            decoder=lambda z: z, eta=0.0, update=update, parameterization=parameterization)
    assert torch.equal(dps, ref)
    if update == "euler":
        rs = sample_resample(model, x, sigmas, {"seed": 7}, disable=True, measurement=w, degradation=world.operator,
                             decoder=lambda z: z, consistency_every=0, parameterization=parameterization)
        assert torch.equal(rs, ref)
