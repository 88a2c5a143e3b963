"""ComfyUI glue: the only package of comfyui-silo that imports the host."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .baselines import LatentDPSKSampler, LatentDPSSampler, ReSampleKSampler, ReSampleSampler
from .degradation import ApplyDegradation, DegradationNode
from .measurement import EncodeMeasurement
from .metrics import PixelUncertainty, RestorationMetrics, RestoreSeeds
from .operator_nodes import LatentOperatorLoader, TrainLatentOperator
from .plots import TracePlot
from .silo import SiloKSampler, SiloSampler

NODES: list[type[io.ComfyNode]] = [
    DegradationNode,
    ApplyDegradation,
    LatentOperatorLoader,
    TrainLatentOperator,
    EncodeMeasurement,
    SiloKSampler,
    SiloSampler,
    LatentDPSKSampler,
    ReSampleKSampler,
    LatentDPSSampler,
    ReSampleSampler,
    RestorationMetrics,
    PixelUncertainty,
    RestoreSeeds,
    TracePlot,
]


class SiloExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
