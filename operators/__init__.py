"""Pure-torch core: degradations, the latent operator network, its file format and its training.

Never imports ComfyUI; usable from plain Python as ``comfyui_silo.operators``.
"""

from .degradations import (
    DEFAULT_MEASUREMENT_NOISE,
    DEGRADATION_TYPES,
    STANDARD_DEGRADATIONS,
    Degradation,
    add_noise,
    build_degradation,
    describe_spec,
    spec_mismatch,
)
from .io import (
    ARCHITECTURES,
    FORMAT,
    FORMAT_VERSION,
    LoadedOperator,
    latent_format_compatible,
    load_operator,
    read_operator_metadata,
    save_operator,
)
from .network import LatentOperator, count_parameters, mask_to_latent
from .reference import SiloReferenceCNN, import_reference_operator
from .training import TrainConfig, TrainResult, TrainState, format_report, train_operator

__all__ = [
    "ARCHITECTURES", "DEFAULT_MEASUREMENT_NOISE", "DEGRADATION_TYPES", "FORMAT", "FORMAT_VERSION",
    "STANDARD_DEGRADATIONS", "Degradation", "LatentOperator", "LoadedOperator", "SiloReferenceCNN", "TrainConfig",
    "TrainResult", "TrainState", "add_noise", "build_degradation", "count_parameters", "describe_spec", "format_report",
    "import_reference_operator", "latent_format_compatible", "load_operator", "mask_to_latent",
    "read_operator_metadata", "save_operator", "spec_mismatch", "train_operator",
]
