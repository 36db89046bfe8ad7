"""Brain tumour segmentation and volume on T1 post-contrast MR, served (issue 5 §1).

Every slice of the series goes through the ``tumour-seg`` U-Net with the card's spec; the
per-pixel probabilities are stretched back to the source grid (the spec's resize is a
plain stretch, so its inverse is one too) and thresholded at the card's operating point,
so the mask lies on the scanner's voxels and the volume is counted in them.

Results, in the source study: a binary DICOM Segmentation (one segment "Tumour") and a
TID 1500 SR with the tumour volume in cm3. The SR's Tracking UID for the lesion is a
one-way hash of the patient key (PatientID and its issuer, never written anywhere), so
the same patient's tumour keeps one Tracking UID across studies, which is what the
longitudinal jobs join on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.imaging import check_spacing, sort_datasets
from dicomnode.imaging.geometry import sort_slices
from dicomnode.inference.aggregate import sigmoid
from dicomnode.pipelines.base import PipelineError, PipelineInput, PipelineResult
from dicomnode.pipelines.brain_tumour import MR_BRAIN, mr_problem
from dicomnode.pipelines.learned import (
    ServedModel,
    describe_point,
    load_model,
    result_uids,
    sr_operating_point,
)
from dicomnode.results import codes
from dicomnode.results.seg import Segment, build_binary_segmentation
from dicomnode.results.sr import (
    Analysed,
    FindingGroup,
    MeasurementValue,
    NotAnalysed,
    Outcome,
    TextNote,
    build_measurement_report,
)
from dicomnode.results.uids import derive_uid

__all__ = ["NEOPLASM", "TRACKING_ID", "TumourVolumePipeline", "tracking_uid", "tumour_mask"]

NEOPLASM = Code("108369006", "SCT", "Neoplasm")
TRACKING_ID = "brain tumour"
SEGMENT_LABEL = "Tumour"
MODEL_NAME = "tumour-seg"
DEFAULT_POINT = "voxel-0.5"


def tracking_uid(datasets: Sequence[Dataset]) -> str:
    """The lesion's Tracking UID: a one-way hash of the patient key, the same in every study."""
    first = datasets[0]
    return derive_uid("tumour-track", str(first.get("PatientID", "") or ""),
                      str(first.get("IssuerOfPatientID", "") or ""))


def tumour_mask(model: ServedModel, slices: Sequence[Dataset], threshold: float
                ) -> npt.NDArray[np.bool_]:
    """(slices, Rows, Columns) tumour mask of a sorted series, on the source grid."""
    outputs = model.run(model.preprocess(slices))
    name = next(o.name for o in model.card.outputs if o.kind == "logits")
    logits = np.asarray(outputs[name], dtype=np.float64)
    probabilities = sigmoid(logits.reshape(len(slices), *logits.shape[-2:])).astype(np.float32)
    rows, columns = int(slices[0].Rows), int(slices[0].Columns)
    mask = np.empty((len(slices), rows, columns), dtype=np.bool_)
    for k in range(len(slices)):
        mask[k] = cv2.resize(probabilities[k], (columns, rows),
                             interpolation=cv2.INTER_LINEAR) >= threshold
    return mask


def largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest 3-D connected part of a (slices, rows, columns) mask (8-connected in
    plane, face-connected between slices): one lesion per patient, stray voxels dropped."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    for k in range(mask.shape[0]):
        n, plane = cv2.connectedComponents(mask[k].astype(np.uint8), connectivity=8)
        plane = plane.astype(np.int32)
        plane[plane > 0] += count
        labels[k] = plane
        count += n - 1
    if count <= 1:
        return mask.copy()
    parent = np.arange(count + 1)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for k in range(mask.shape[0] - 1):
        both = (labels[k] > 0) & (labels[k + 1] > 0)
        if both.any():
            pairs = np.unique(np.stack([labels[k][both], labels[k + 1][both]], axis=1), axis=0)
            for a, b in pairs:
                parent[find(int(a))] = find(int(b))
    roots = np.array([find(i) for i in range(count + 1)])
    component = roots[labels]
    sizes = np.bincount(component[mask], minlength=count + 1)
    kept: npt.NDArray[np.bool_] = mask & (component == int(np.argmax(sizes)))
    return kept


def postprocess(mask: npt.NDArray[np.bool_], name: str | None) -> npt.NDArray[np.bool_]:
    """The card's postprocessing of the source-grid mask (``provenance.postprocessing``)."""
    if not name:
        return mask
    if name == "largest-3d-component":
        return largest_component(mask)
    raise PipelineError(f"the model card names an unknown postprocessing {name!r}")


def voxel_mm3(slices: Sequence[Dataset]) -> float:
    spacing = check_spacing(sort_slices(slices)).spacing
    if spacing is None:
        spacing = float(slices[0].get("SpacingBetweenSlices", slices[0].SliceThickness))
    row_mm, column_mm = (float(v) for v in slices[0].PixelSpacing)
    return row_mm * column_mm * float(spacing)


class TumourVolumePipeline:
    name = "dicomnode tumour volume MR"
    version = "1"
    model_name = MODEL_NAME

    def run(self, work: PipelineInput) -> PipelineResult:
        model = load_model(work.models_dir, str(work.options.get("model", self.model_name)),
                           work.options)
        point = model.operating_point(work.options.get("operating_point"), (DEFAULT_POINT,))
        algorithm = model.algorithm
        sr_series = result_uids(work, algorithm, "sr")
        datasets = list(work.datasets)
        first = datasets[0]
        track = tracking_uid(datasets)
        study_date = str(first.get("StudyDate", "") or "")
        notes = [TextNote(
            f"Tumour = necrotic core + enhancing/solid tumour (oedema excluded), segmented "
            f"slice by slice; voxels at or above {describe_point(point)}; the largest "
            "3-D connected part is kept when the model card says so. The Tracking UID "
            "is the same for this patient's brain tumour in every study.")]
        problem = mr_problem(datasets)
        objects: list[Dataset] = []
        summary: dict[str, Any]
        if problem is not None:
            outcome: Outcome = NotAnalysed(f"Not analysed: {problem}.")
            summary = {"analysed": False, "reason": problem, "study_date": study_date,
                       "tracking_uid": track}
        else:
            slices = sort_datasets(datasets)
            post = model.card.provenance.get("postprocessing")
            mask = postprocess(tumour_mask(model, slices, point.threshold),
                               str(post) if post else None)
            volume = float(mask.sum()) * voxel_mm3(slices) / 1000.0
            with_tumour = [i for i in range(len(slices)) if mask[i].any()]
            outcome = Analysed((FindingGroup(
                tracking_id=TRACKING_ID, finding_type=NEOPLASM, finding_site=codes.BRAIN,
                measurements=(MeasurementValue(codes.VOLUME, round(volume, 3),
                                               codes.UCUM_CUBIC_CENTIMETER),),
                source_sop_instance_uids=tuple(str(slices[i].SOPInstanceUID)
                                               for i in with_tumour),
                operating_point=sr_operating_point(point), tracking_uid=track),))
            objects.append(build_binary_segmentation(
                slices, mask, Segment(SEGMENT_LABEL, NEOPLASM, TRACKING_ID, track,
                                      anatomic_region=codes.BRAIN),
                algorithm, series_instance_uid=result_uids(work, algorithm, "seg"),
                series_description="AI tumour segmentation", content_label="TUMOUR"))
            summary = {"analysed": True, "volume_cm3": round(volume, 3),
                       "study_date": study_date, "tracking_uid": track,
                       "slices": len(slices), "slices_with_tumour": len(with_tumour)}
        objects.insert(0, build_measurement_report(
            datasets, outcome, algorithm, series_instance_uid=sr_series,
            sop_instance_uid=derive_uid(sr_series, 1),
            series_description="AI tumour volume report", procedure_reported=MR_BRAIN,
            notes=tuple(notes)))
        return PipelineResult(objects, summary, analysed=problem is None)
