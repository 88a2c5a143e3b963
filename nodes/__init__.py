"""ComfyUI glue: the only package of comfyui-silo that imports the host."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .degradation import ApplyDegradation, DegradationNode
from .measurement import EncodeMeasurement
from .metrics import PixelUncertainty, RestorationMetrics, RestoreSeeds
from .operator_nodes import LatentOperatorLoader, TrainLatentOperator
from .plots import TracePlot
from .solvers import SOLVERS


def node_list() -> list[type[io.ComfyNode]]:
    """Every node of the pack: the fixed ones around the solver nodes of every registration
    (:func:`.solvers.register`)."""
    return [DegradationNode, ApplyDegradation, LatentOperatorLoader, TrainLatentOperator, EncodeMeasurement,
            *(node for pair in SOLVERS.values() for node in pair),
            RestorationMetrics, PixelUncertainty, RestoreSeeds, TracePlot]


class SiloExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
