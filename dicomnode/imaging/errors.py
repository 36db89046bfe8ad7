"""The exceptions of the imaging package.

Pipelines turn these into a "cannot analyse" SR with the message as the reason, so every
message names what was wrong in words a reader of that SR understands, and never patient
data.
"""

from __future__ import annotations


class ImagingError(Exception):
    """Base of everything this package raises on purpose."""


class PixelDataError(ImagingError):
    """The pixel data cannot be turned into values the way it was asked for."""


class SeriesGeometryError(ImagingError):
    """Slices do not form the geometry asked for (orientation, spacing, positions)."""


class SpecError(ImagingError, ValueError):
    """A preprocessing spec is malformed; the message names the step and the parameter."""


class SliceOrderWarning(UserWarning):
    """Slices were ordered by a weaker key than their positions (InstanceNumber)."""
