"""Pneumonia on frontal chest radiographs (seed 004), served.

Each frontal CR/DX image of the series is scored by the bundled (or configured) model;
the SR gives, per image, the probability, the decision at the chosen operating point and
what the card reports for that point on held-out data; a Secondary Capture per image
shows the in-graph Grad-CAM over the radiograph at its own resolution. Laterals and
images the model was not built for are listed as not analysed, never guessed at.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.inference.aggregate import sigmoid
from dicomnode.pipelines.base import PipelineInput, PipelineResult
from dicomnode.pipelines.learned import (
    ABSENT,
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

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
MODALITIES = ("CR", "DX")
FRONTAL = ("PA", "AP")
MIN_SIZE = 256


def image_problem(ds: Dataset) -> str | None:
    """Why this image is outside what the model was built for, if it is."""
    if str(ds.get("Modality", "")) not in MODALITIES:
        return f"modality {ds.get('Modality', 'missing')} is not CR or DX"
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view and view not in FRONTAL:
        return f"view position {view} is not frontal (PA or AP)"
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"photometric interpretation {photometric or 'missing'} is not greyscale"
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return "multi-frame radiographs are not supported"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < MIN_SIZE:
        return f"image of {rows} x {cols} pixels is smaller than {MIN_SIZE} on a side"
    return None


class PneumoniaPipeline:
    name = "dicomnode pneumonia CXR"
    version = "1"
    model_name = "pneumonia-cxr"

    def run(self, work: PipelineInput) -> PipelineResult:
        model = load_model(work.models_dir, str(work.options.get("model", self.model_name)),
                           work.options)
        point = model.operating_point(work.options.get("operating_point"),
                                      ("screening", "sensitivity-0.9", "balanced"))
        algorithm = model.algorithm
        images: list[Dataset] = []
        skipped: list[str] = []
        for ds in work.datasets:
            problem = image_problem(ds)
            if problem is None:
                values = ds.pixel_array
                if float(np.ptp(values)) == 0.0:
                    problem = "the image has a single pixel value"
            if problem is None:
                images.append(ds)
            else:
                skipped.append(f"image {ds.get('InstanceNumber', '?')}: {problem}")

        sr_series = result_uids(work, algorithm, "sr")
        notes = [TextNote(f"Decision at {describe_point(point)}.")]
        notes += [TextNote(f"Not analysed: {s}.") for s in skipped]
        objects: list[Dataset] = []
        summary: dict[str, object] = {"operating_point": point.name, "skipped": len(skipped)}
        if not images:
            outcome: Outcome = NotAnalysed("no frontal chest radiograph the model was built "
                                           "for: " + "; ".join(skipped))
            summary["analysed"] = False
        else:
            outputs = model.run(model.preprocess(images))
            score = next(o.name for o in model.card.outputs if o.kind == "logits")
            logits = np.asarray(outputs[score], dtype=np.float64).reshape(
                len(images), -1)[:, 0]
            probabilities = sigmoid(logits)
            cam_name = next((o.name for o in model.card.outputs if o.kind == "cam"), None)
            sc_series = result_uids(work, algorithm, "sc")
            groups: list[FindingGroup] = []
            for i, (ds, p) in enumerate(zip(images, probabilities, strict=True)):
                positive = bool(p >= point.threshold)
                groups.append(FindingGroup(
                    tracking_id=f"pneumonia image {ds.get('InstanceNumber', i + 1)}",
                    finding_type=PNEUMONIA, finding_site=codes.LUNG,
                    measurements=(probability(float(p)),),
                    evaluations=(Evaluation(PNEUMONIA, PRESENT if positive else ABSENT),),
                    source_sop_instance_uids=(str(ds.SOPInstanceUID),),
                    operating_point=sr_operating_point(point)))
                if cam_name is not None:
                    cam = np.asarray(outputs[cam_name][i])
                    objects.append(build_secondary_capture(
                        [ds], heatmap_overlay(ds, cam.reshape(cam.shape[-2:])), algorithm,
                        series_instance_uid=sc_series,
                        sop_instance_uid=derive_uid(sc_series, len(objects) + 1),
                        series_description="AI pneumonia heatmap",
                        instance_number=len(objects) + 1, caption_lines=(
                        f"Pneumonia probability {percent(float(p))}: "
                        f"{'ABOVE' if positive else 'below'} the '{point.name}' threshold "
                        f"{percent(point.threshold)}",
                        f"Card: sensitivity {point.sensitivity:.2f}, specificity "
                        f"{point.specificity:.2f} on held-out synthetic data",
                        "Colour: regions that raised the score (Grad-CAM)")))
            outcome = Analysed(tuple(groups))
            summary.update(analysed=True, probabilities=[round(float(p), 4)
                                                         for p in probabilities],
                           positive=int(sum(p >= point.threshold for p in probabilities)))
        objects.insert(0, build_measurement_report(
            list(work.datasets), outcome, algorithm, series_instance_uid=sr_series,
            sop_instance_uid=derive_uid(sr_series, 1),
            series_description="AI pneumonia report",
            procedure_reported=codes.XR_UNSPECIFIED_BODY_REGION, notes=tuple(notes)))
        return PipelineResult(objects, summary, analysed=bool(images))
