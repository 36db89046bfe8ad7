"""The inference exception tree.

Callers (pipelines, ``dicomnode models``) catch :class:`InferenceError` for "this model
cannot produce a result" and the subclasses when they want to say why. Every message
names the package or input concerned so the one-line CLI error is enough to act on,
and none carries pixel data or patient details.

::

    InferenceError
    ├── ModelPackageError            the package on disk cannot be trusted or used
    │   ├── PackageNotFoundError     directory, model.yaml or model.onnx absent
    │   ├── InvalidCardError         model.yaml unreadable or a value is wrong
    │   │   └── IncompleteCardError  required keys are missing (all of them are named)
    │   ├── ChecksumMismatchError    model.onnx is not the file the card describes
    │   └── SignatureMismatchError   ONNX inputs/outputs differ from the card's
    ├── ProviderUnavailableError     a required execution provider is not usable
    ├── ResourceBudgetError          one sample does not fit the memory budget
    ├── InputValidationError         wrong input names, shape or dtype
    └── InferenceRunError            ONNX Runtime failed while running
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ChecksumMismatchError",
    "IncompleteCardError",
    "InferenceError",
    "InferenceRunError",
    "InputValidationError",
    "InvalidCardError",
    "ModelPackageError",
    "PackageNotFoundError",
    "ProviderUnavailableError",
    "ResourceBudgetError",
    "SignatureMismatchError",
]


class InferenceError(Exception):
    """Base of every error raised by :mod:`dicomnode.inference`."""


class ModelPackageError(InferenceError):
    """A model package cannot be loaded."""


class PackageNotFoundError(ModelPackageError):
    """The package directory or one of its two files does not exist."""


class InvalidCardError(ModelPackageError):
    """model.yaml is not valid YAML or holds a value of the wrong type or range."""


class IncompleteCardError(InvalidCardError):
    """model.yaml lacks required keys; ``missing`` lists them as dotted paths."""

    def __init__(self, source: str, missing: Sequence[str]) -> None:
        self.source = source
        self.missing = tuple(missing)
        super().__init__(f"model card {source} is missing required keys: {', '.join(self.missing)}")


class ChecksumMismatchError(ModelPackageError):
    """The sha256 of model.onnx differs from the one recorded in the card."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{path} has sha256 {actual}, but its model card says {expected}: the model "
            "file was replaced or corrupted; re-export the package"
        )


class SignatureMismatchError(ModelPackageError):
    """The ONNX graph's inputs or outputs do not match the card's signature."""

    def __init__(self, path: str, differences: Sequence[str]) -> None:
        self.path = path
        self.differences = tuple(differences)
        super().__init__(f"{path} does not match its model card: " + "; ".join(self.differences))


class ProviderUnavailableError(InferenceError):
    """An execution provider that the settings require could not be used."""


class ResourceBudgetError(InferenceError):
    """The configured memory budget cannot hold even one sample of this model."""


class InputValidationError(InferenceError, ValueError):
    """The arrays given to a session do not match the model's input specification."""


class InferenceRunError(InferenceError):
    """ONNX Runtime raised while running a model (the original error is chained)."""
