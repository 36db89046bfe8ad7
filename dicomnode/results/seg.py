"""Binary DICOM Segmentations (highdicom) of what an algorithm outlined on a series.

The SEG goes into the source study as its own series, references the source images
frame by frame, names the algorithm (name, version, model sha256) as an AUTOMATIC
segment's algorithm identification, and carries the finding's Tracking UID, so the SEG
and the SR that measures it name the same lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from dicomnode.results.common import (
    MANUFACTURER,
    AlgorithmInfo,
    check_series_description,
    no_person_name_warnings,
    reference_dataset,
    software_versions,
)
from dicomnode.results.uids import derive_uid

__all__ = ["Segment", "build_binary_segmentation"]


@dataclass(frozen=True)
class Segment:
    """What one binary segment is: a label for people, coded category and type, and the
    finding it belongs to (Tracking ID and UID, as in the SR)."""

    label: str
    property_type: Code
    tracking_id: str
    tracking_uid: str
    property_category: Code = dicom_codes.SCT.MorphologicallyAbnormalStructure
    anatomic_region: Code | None = None


def build_binary_segmentation(
    sources: Sequence[Dataset],
    mask: npt.NDArray[np.bool_],
    segment: Segment,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    series_description: str,
    series_number: int = 901,
    content_label: str = "SEGMENTATION",
) -> Dataset:
    """A binary SEG of ``mask`` (one 2-D plane per source image, in ``sources`` order).

    Empty planes are left out unless the whole mask is empty (a SEG needs a frame).
    """
    reference_dataset(sources)
    check_series_description(series_description)
    if mask.shape[0] != len(sources):
        raise ValueError(f"mask has {mask.shape[0]} planes for {len(sources)} source images")
    parameters = {"model sha256": algorithm.sha256} if algorithm.sha256 else None
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version,
        family=dicom_codes.cid7162.ArtificialIntelligence, source=MANUFACTURER,
        parameters=parameters)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment.label,
        segmented_property_category=segment.property_category,
        segmented_property_type=segment.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification,
        tracking_uid=segment.tracking_uid, tracking_id=segment.tracking_id,
        anatomic_regions=[segment.anatomic_region] if segment.anatomic_region else None)
    with no_person_name_warnings():
        seg = hd.seg.Segmentation(
            source_images=list(sources), pixel_array=mask.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=series_instance_uid, series_number=series_number,
            sop_instance_uid=derive_uid(series_instance_uid, 1), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=algorithm.name,
            software_versions=algorithm.label[:64],
            device_serial_number=(algorithm.sha256 or algorithm.version)[:16],
            content_label=content_label, content_description=series_description,
            omit_empty_frames=bool(mask.any()),
            series_description=series_description)
    seg.add_new("SoftwareVersions", "LO", list(software_versions(algorithm)))
    return seg
