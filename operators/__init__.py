"""Pure-torch core: degradations, the measurement model, the latent operator network, its file format, training.

Never imports ComfyUI; usable from plain Python as ``comfyui_silo.operators``. Modules import one way:
``text`` ← ``degradations`` ← ``physics``; ``files`` ← ``reference`` ← ``io``; ``network`` ← ``training``.
"""

from .degradations import (
    DEFAULT_MEASUREMENT_NOISE,
    DEGRADATION_TYPES,
    DEGRADATIONS,
    INPAINT_TYPES,
    STANDARD_DEGRADATIONS,
    Degradation,
    SpecMismatch,
    add_noise,
    build_degradation,
    describe_spec,
    spec_mismatch,
)
from .files import MAX_OPERATOR_PARAMETERS, latent_family, operator_file_name
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
from .physics import LATENT_CLAMP, DegradationLike, GaussianNoise, Measurement, MeasurementError
from .reference import SiloReferenceCNN, import_reference_operator
from .training import (
    TrainingDataError,
    TrainResult,
    TrainSettings,
    TrainState,
    format_report,
    train_operator,
)

__all__ = [
    "ARCHITECTURES", "DEFAULT_MEASUREMENT_NOISE", "DEGRADATIONS", "DEGRADATION_TYPES", "FORMAT", "FORMAT_VERSION",
    "INPAINT_TYPES", "LATENT_CLAMP", "MAX_OPERATOR_PARAMETERS", "STANDARD_DEGRADATIONS", "Degradation",
    "DegradationLike", "GaussianNoise", "LatentOperator", "LoadedOperator", "Measurement", "MeasurementError",
    "SiloReferenceCNN", "SpecMismatch", "TrainResult", "TrainSettings", "TrainState",
    "TrainingDataError", "add_noise", "build_degradation", "count_parameters", "describe_spec", "format_report",
    "import_reference_operator", "latent_family", "latent_format_compatible", "load_operator", "mask_to_latent",
    "operator_file_name", "read_operator_metadata", "save_operator", "spec_mismatch", "train_operator",
]
