"""Serving models: packages (card + ONNX), warm ONNX Runtime sessions, batching.

Needs only numpy, PyYAML and onnxruntime; torch lives in :mod:`dicomnode.training`.
"""

from dicomnode.inference.errors import (
    ChecksumMismatchError,
    IncompleteCardError,
    InferenceError,
    InferenceRunError,
    InputValidationError,
    InvalidCardError,
    ModelPackageError,
    PackageNotFoundError,
    ProviderUnavailableError,
    ResourceBudgetError,
    SignatureMismatchError,
)
from dicomnode.inference.package import (
    Metric,
    ModelCard,
    ModelPackage,
    OperatingPoint,
    OutputSpec,
    ResourceEstimate,
    TensorSpec,
    TrainingData,
    load_card,
    load_package,
)
from dicomnode.inference.runtime import (
    InferenceResult,
    ModelSession,
    RuntimeSettings,
    SessionCache,
    open_model,
    open_session,
)

__all__ = [
    "ChecksumMismatchError",
    "IncompleteCardError",
    "InferenceError",
    "InferenceResult",
    "InferenceRunError",
    "InputValidationError",
    "InvalidCardError",
    "Metric",
    "ModelCard",
    "ModelPackage",
    "ModelPackageError",
    "ModelSession",
    "OperatingPoint",
    "OutputSpec",
    "PackageNotFoundError",
    "ProviderUnavailableError",
    "ResourceBudgetError",
    "ResourceEstimate",
    "RuntimeSettings",
    "SessionCache",
    "SignatureMismatchError",
    "TensorSpec",
    "TrainingData",
    "load_card",
    "load_package",
    "open_model",
    "open_session",
]
