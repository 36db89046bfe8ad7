"""Brain metastases on axial head CT (seed 002), served.

Every slice of the series goes through the model in batches (one ONNX Runtime pass gives
each slice's logit and its Grad-CAM); the patient logit is the maximum over slices, as
the model was evaluated, and is compared with the F1-optimal threshold the card records
from validation patients. The SR names the slices that drove the result; the SC series
shows heatmaps for the top slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.imaging import SeriesGeometryError, check_spacing, require_plane, sort_datasets
from dicomnode.imaging.geometry import sort_slices
from dicomnode.inference.aggregate import max_pool_slices, sigmoid
from dicomnode.pipelines.base import PipelineInput, PipelineResult
from dicomnode.pipelines.learned import (
    ABSENT,
    BRAIN_WINDOW_DISPLAY,
    PRESENT,
    describe_point,
    heatmap_overlay,
    load_model,
    percent,
    result_uids,
    sr_operating_point,
)
from dicomnode.results import codes
from dicomnode.results.sc import build_secondary_capture
from dicomnode.results.sr import (
    Analysed,
    Evaluation,
    FindingGroup,
    NotAnalysed,
    Outcome,
    TextNote,
    build_measurement_report,
    probability,
)
from dicomnode.results.uids import derive_uid

METASTASIS = Code("94225005", "SCT", "Metastatic malignant neoplasm to brain")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MIN_SLICES = 12
MAX_SLICE_MM = 7.5
TOP_SLICES = 3


def series_problem(datasets: Sequence[Dataset]) -> str | None:
    """Why this series is outside what the model was built for, if it is."""
    if any(str(ds.get("Modality", "")) != "CT" for ds in datasets):
        return "not a CT series"
    if any(str(ds.get("SOPClassUID", "")) != CT_STORAGE for ds in datasets):
        return "not stored as single-frame CT Image Storage"
    if len(datasets) < MIN_SLICES:
        return f"only {len(datasets)} slices; the head needs at least {MIN_SLICES}"
    if any(str(ds.get("PhotometricInterpretation", "")) != "MONOCHROME2" for ds in datasets):
        return "photometric interpretation is not MONOCHROME2"
    try:
        require_plane(datasets, "axial")
        report = check_spacing(sort_slices(datasets))
    except SeriesGeometryError as exc:
        return str(exc)
    if not report.uniform:
        return "slice spacing is not uniform: " + "; ".join(report.problems())
    if report.spacing is not None and report.spacing > MAX_SLICE_MM:
        return f"slices {report.spacing:.1f} mm apart; at most {MAX_SLICE_MM} mm supported"
    middle = datasets[len(datasets) // 2]
    hu = middle.pixel_array.astype(np.float64) * float(middle.get("RescaleSlope", 1)) + float(
        middle.get("RescaleIntercept", 0))
    if hu.max() < 300 or hu.min() > -500:
        return "pixel values do not look like Hounsfield units of a head (no bone or air)"
    return None


class MetastasisPipeline:
    name = "dicomnode brain metastasis CT"
    version = "1"
    model_name = "metastasis-ct"

    def run(self, work: PipelineInput) -> PipelineResult:
        model = load_model(work.models_dir, str(work.options.get("model", self.model_name)),
                           work.options)
        point = model.operating_point(work.options.get("operating_point"), ("f1-optimal",))
        algorithm = model.algorithm
        sr_series = result_uids(work, algorithm, "sr")
        problem = series_problem(work.datasets)
        objects: list[Dataset] = []
        notes = [TextNote(f"Decision at {describe_point(point)}; patient score = the "
                          "highest slice score (max pooling), as the model was validated.")]
        if problem is not None:
            outcome: Outcome = NotAnalysed(f"Not analysed: {problem}.")
            summary: dict[str, object] = {"analysed": False, "reason": problem}
        else:
            slices = sort_datasets(list(work.datasets))
            outputs = model.run(model.preprocess(slices))
            score = next(o.name for o in model.card.outputs if o.kind == "logits")
            logits = np.asarray(outputs[score], dtype=np.float64).reshape(len(slices), -1)[:, 0]
            pooled = max_pool_slices(logits[:, None])
            slice_p = sigmoid(logits)
            p = float(sigmoid(np.asarray(pooled.logits, dtype=np.float64))[0])
            positive = p >= point.threshold
            top = [int(i) for i in np.argsort(-logits)[:TOP_SLICES]]
            top_uids = tuple(str(slices[i].SOPInstanceUID) for i in top)
            outcome = Analysed((FindingGroup(
                tracking_id="brain metastasis", finding_type=METASTASIS,
                finding_site=codes.BRAIN, measurements=(probability(p),),
                evaluations=(Evaluation(METASTASIS, PRESENT if positive else ABSENT),),
                source_sop_instance_uids=top_uids, operating_point=sr_operating_point(point)),))
            notes.append(TextNote("Slices that drove the result (highest scores first): "
                                  + ", ".join(f"instance {slices[i].get('InstanceNumber', i)}"
                                              f" ({percent(float(slice_p[i]))})" for i in top)))
            cam_name = next((o.name for o in model.card.outputs if o.kind == "cam"), None)
            if cam_name is not None:
                sc_series = result_uids(work, algorithm, "sc")
                cams = np.asarray(outputs[cam_name])
                for rank, i in enumerate(top, start=1):
                    q = float(slice_p[i])
                    objects.append(build_secondary_capture(
                        [slices[i]], heatmap_overlay(slices[i], cams[i].reshape(
                            cams[i].shape[-2:]), display=BRAIN_WINDOW_DISPLAY), algorithm,
                        series_instance_uid=sc_series,
                        sop_instance_uid=derive_uid(sc_series, rank),
                        series_description="AI metastasis heatmaps", instance_number=rank,
                        caption_lines=(
                            f"Slice rank {rank} of the series: slice score {percent(q)}",
                            f"Patient: metastasis probability {percent(p)}, "
                            f"{'ABOVE' if positive else 'below'} the '{point.name}' threshold "
                            f"{percent(point.threshold)}",
                            "Colour: regions that raised the slice score (Grad-CAM)")))
            summary = {"analysed": True, "probability": round(p, 4), "positive": positive,
                       "top_slice": int(pooled.slice_index[0]), "slices": len(slices)}
        objects.insert(0, build_measurement_report(
            list(work.datasets), outcome, algorithm, series_instance_uid=sr_series,
            sop_instance_uid=derive_uid(sr_series, 1),
            series_description="AI brain metastasis report",
            procedure_reported=codes.CT_UNSPECIFIED_BODY_REGION, notes=tuple(notes)))
        return PipelineResult(objects, summary, analysed=problem is None)
