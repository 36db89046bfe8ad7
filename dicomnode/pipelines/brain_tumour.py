"""Brain tumour on CT and MR, with CT+MR fusion (seed 003), served.

One job receives the brain CT and MR series of a study (a study-level route) and,
when the route asks for them, the same patient's CT and MR series from other studies
within a window (``options.related``). Each series of the study is analysed by its own
model — CT: tumour / no tumour; MR (T1 post-contrast): healthy / benign / malignant —
and each gets its own SR and heatmap. When a CT and an MR of the patient are both at
hand (at least one of them from this study), the fusion model runs too and its answer
is reported beside the single-modality ones, never instead of them. Its stage and
survival-risk heads were trained on synthetic proxies: they are written as research
outputs, labelled so, never as findings.

A series' answer is its key slice's (the slice with the highest tumour score), the rule
the models were evaluated with (``brain_rules``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.imaging import (
    PreprocessSpec,
    SeriesGeometryError,
    apply_spec,
    check_spacing,
    require_plane,
    sort_datasets,
)
from dicomnode.imaging.geometry import sort_slices
from dicomnode.inference.package import OperatingPoint
from dicomnode.pipelines import brain_rules
from dicomnode.pipelines.base import PipelineError, PipelineInput, PipelineResult
from dicomnode.pipelines.learned import (
    ABSENT,
    BRAIN_WINDOW_DISPLAY,
    PRESENT,
    ModelUnavailableError,
    ServedModel,
    describe_point,
    heatmap_overlay,
    load_model,
    percent,
    sr_operating_point,
)
from dicomnode.results import codes
from dicomnode.results.common import AlgorithmInfo
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

BRAIN_NEOPLASM = Code("126952004", "SCT", "Neoplasm of brain")
BENIGN_NEOPLASM = Code("92030004", "SCT", "Benign neoplasm of brain")
MALIGNANT_NEOPLASM = Code("428061005", "SCT", "Malignant neoplasm of brain")
CT_HEAD = Code("24725-4", "LN", "CT Head")
MR_BRAIN = Code("24590-2", "LN", "MR Brain")
STAGE_PROXY = codes.local_code("DN-STAGE-PROXY", "Stage proxy (research output)")
RISK_PROXY = codes.local_code("DN-RISK-PROXY", "Survival-risk proxy (research output)")

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MIN_SLICES = 8
MAX_SLICE_MM = 7.5
T1_POST_CONTRAST = re.compile(r"(?i)(t1.*(post|\+ ?c|gad|contrast|ce\b))|t1c|mprage.*(gd|gad)")
RESEARCH = ("RESEARCH OUTPUT, not a finding: trained on synthetic proxies "
            "(stage from tumour size, risk from class and size); not validated on patients.")

log = logging.getLogger(__name__)

CT_MODEL = "brain-tumour-ct"
MR_MODEL = "brain-tumour-mr"
FUSION_MODEL = "brain-tumour-fusion"


def _plane_and_spacing(datasets: Sequence[Dataset]) -> str | None:
    try:
        require_plane(datasets, "axial")
        report = check_spacing(sort_slices(datasets))
    except SeriesGeometryError as exc:
        return str(exc)
    if not report.uniform:
        return "slice spacing is not uniform: " + "; ".join(report.problems())
    if report.spacing is not None and report.spacing > MAX_SLICE_MM:
        return f"slices {report.spacing:.1f} mm apart; at most {MAX_SLICE_MM} mm supported"
    return None


def _common_problem(datasets: Sequence[Dataset], modality: str, sop_class: str) -> str | None:
    if any(str(ds.get("Modality", "")) != modality for ds in datasets):
        return f"not a {modality} series"
    if any(str(ds.get("SOPClassUID", "")) != sop_class for ds in datasets):
        return f"not stored as single-frame {modality} Image Storage"
    if len(datasets) < MIN_SLICES:
        return f"only {len(datasets)} slices; the brain needs at least {MIN_SLICES}"
    if any(str(ds.get("PhotometricInterpretation", "")) != "MONOCHROME2" for ds in datasets):
        return "photometric interpretation is not MONOCHROME2"
    return _plane_and_spacing(datasets)


def ct_problem(datasets: Sequence[Dataset]) -> str | None:
    """Why this CT series is outside what the CT model was built for, if it is."""
    problem = _common_problem(datasets, "CT", CT_STORAGE)
    if problem is not None:
        return problem
    middle = datasets[len(datasets) // 2]
    hu = middle.pixel_array.astype(np.float64) * float(middle.get("RescaleSlope", 1)) + float(
        middle.get("RescaleIntercept", 0))
    if hu.max() < 300 or hu.min() > -500:
        return "pixel values do not look like Hounsfield units of a head (no bone or air)"
    return None


def mr_problem(datasets: Sequence[Dataset]) -> str | None:
    """Why this MR series is outside what the MR model was built for, if it is."""
    problem = _common_problem(datasets, "MR", MR_STORAGE)
    if problem is not None:
        return problem
    first = datasets[0]
    described = " ".join(str(first.get(k, "") or "") for k in
                         ("SeriesDescription", "ProtocolName", "SequenceName"))
    if not (str(first.get("ContrastBolusAgent", "") or "").strip()
            or T1_POST_CONTRAST.search(described)):
        return ("not a T1 post-contrast series (no contrast agent recorded and no "
                "T1 post-contrast description); the model was built on T1 post-contrast")
    if float(np.ptp(first.pixel_array)) == 0.0:
        return "the image has a single pixel value"
    return None


def group_series(datasets: Sequence[Dataset]) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for ds in datasets:
        out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return out


def _label(ds: Dataset) -> str:
    return f"{ds.get('Modality', '?')} series {ds.get('SeriesNumber', '?')}"


@dataclass
class Analysis:
    """One series through its model: what the fusion step and the results need."""

    slices: list[Dataset]
    tensor: npt.NDArray[np.float32] | None
    result: brain_rules.SeriesResult | None
    problem: str | None
    current: bool  # from this job's study (not a related study)


def _outputs(model: ServedModel, kind: str) -> str | None:
    return next((o.name for o in model.card.outputs if o.kind == kind), None)


def _point(model: ServedModel, cls: str, preferred: str | None) -> OperatingPoint | None:
    points = {p.name: p for p in model.card.operating_points}
    for name in (f"{cls}:{preferred}" if preferred else None, f"{cls}:f1-optimal",
                 preferred, "f1-optimal"):
        if name and name in points and (points[name].class_name in (None, cls)):
            return points[name]
    return None


def _evaluation(concept: Code, p: float, point: OperatingPoint | None
                ) -> tuple[tuple[Evaluation, ...], Any]:
    if point is None:
        return (), None
    # the card names per-class points "class:name"; the SR's point name has no ':'
    named = dataclasses.replace(point, name=point.name.replace(":", " "))
    return ((Evaluation(concept, PRESENT if p >= point.threshold else ABSENT),),
            sr_operating_point(named))


class BrainTumourPipeline:
    name = "dicomnode brain tumour"
    version = "1"

    def run(self, work: PipelineInput) -> PipelineResult:
        options = work.options
        ct_model = load_model(work.models_dir, str(options.get("ct_model", CT_MODEL)), options)
        mr_model = load_model(work.models_dir, str(options.get("mr_model", MR_MODEL)), options)
        objects: list[Dataset] = []
        summary: dict[str, Any] = {"series": []}
        analyses: dict[str, list[Analysis]] = {"CT": [], "MR": []}

        for datasets, current in [(s, True) for s in group_series(work.datasets).values()] + [
                (s, False) for s in group_series(work.related_datasets).values()]:
            modality = str(datasets[0].get("Modality", ""))
            if modality not in analyses:
                continue
            model = ct_model if modality == "CT" else mr_model
            problem = ct_problem(datasets) if modality == "CT" else mr_problem(datasets)
            slices = sort_datasets(list(datasets)) if problem is None else list(datasets)
            analysis = Analysis(slices, None, None, problem, current)
            if problem is None:
                analysis.tensor = model.preprocess(slices)
                outputs = model.run(analysis.tensor)
                logits_name = _outputs(model, "logits")
                cam_name = _outputs(model, "cam")
                if logits_name is None:
                    raise PipelineError(f"model {model.card.name} has no logits output")
                logits = np.asarray(outputs[logits_name], dtype=np.float64).reshape(
                    len(slices), -1)
                cams = None if cam_name is None else np.asarray(outputs[cam_name])
                analysis.result = brain_rules.series_result(logits, cams)
            analyses[modality].append(analysis)

        for modality, found in analyses.items():
            model = ct_model if modality == "CT" else mr_model
            mine = [a for a in found if a.current]
            usable = any(a.result is not None for a in mine)
            for a in mine:
                summary["series"].append(self._series_summary(modality, a))
                # A study's other MR sequences (T2, FLAIR, ...) are expected: when one of
                # its series could be analysed, the others are listed in the summary
                # instead of each filling the PACS with a "not analysed" report.
                if a.result is not None or not usable:
                    objects += self._series_results(work, modality, model, a)

        fusion = self._fusion(work, analyses)
        if fusion is not None:
            fusion_objects, fusion_summary = fusion
            objects += fusion_objects
            summary["fusion"] = fusion_summary
        analysed = any(a.result is not None and a.current for v in analyses.values() for a in v)
        if not any(a.current for v in analyses.values() for a in v):
            raise PipelineError("the brain tumour route sent no CT or MR series")
        return PipelineResult(objects, summary, analysed=analysed)

    # -- one series ---------------------------------------------------------------------

    @staticmethod
    def _series_summary(modality: str, a: Analysis) -> dict[str, Any]:
        if a.result is None:
            return {"modality": modality, "analysed": False, "reason": a.problem}
        return {"modality": modality, "analysed": True, "key_slice": a.result.key_slice,
                "probabilities": [round(float(p), 4) for p in a.result.probabilities]}

    def _series_results(self, work: PipelineInput, modality: str, model: ServedModel,
                        a: Analysis) -> list[Dataset]:
        algorithm = model.algorithm
        series_uid = str(a.slices[0].SeriesInstanceUID)
        sr_series = work.result_uid(algorithm.name, algorithm.version, "sr-series", series_uid)
        what = f"{_label(a.slices[0])}"
        notes: list[TextNote] = []
        objects: list[Dataset] = []
        if a.result is None:
            outcome: Outcome = NotAnalysed(f"Not analysed ({what}): {a.problem}.")
        else:
            key = a.slices[a.result.key_slice]
            key_uid = (str(key.SOPInstanceUID),)
            notes.append(TextNote(
                f"{what}: the series' answer is its key slice's (instance "
                f"{key.get('InstanceNumber', a.result.key_slice + 1)}), the slice with the "
                "highest tumour score, as the model was validated."))
            preferred = work.options.get("operating_point")
            if modality == "CT":
                p = float(a.result.probabilities[0])
                point = (_point(model, "tumour", str(preferred) if preferred else None)
                         or model.card.operating_points[0])
                evaluations, op = _evaluation(BRAIN_NEOPLASM, p, point)
                groups: tuple[FindingGroup, ...] = (FindingGroup(
                    tracking_id="brain tumour (CT)", finding_type=BRAIN_NEOPLASM,
                    finding_site=codes.BRAIN, measurements=(probability(p),),
                    evaluations=evaluations, source_sop_instance_uids=key_uid,
                    operating_point=op),)
                notes.append(TextNote(f"Decision at {describe_point(point)}."))
                caption = (f"Tumour probability {percent(p)}: "
                           f"{'ABOVE' if p >= point.threshold else 'below'} the "
                           f"'{point.name}' threshold {percent(point.threshold)}")
            else:
                probs = a.result.probabilities
                mr_groups: list[FindingGroup] = []
                for index, (cls, concept) in enumerate(
                        (("benign", BENIGN_NEOPLASM), ("malignant", MALIGNANT_NEOPLASM)),
                        start=1):
                    p = float(probs[index])
                    mr_point = _point(model, cls, str(preferred) if preferred else None)
                    evaluations, op = _evaluation(concept, p, mr_point)
                    mr_groups.append(FindingGroup(
                        tracking_id=f"brain tumour (MR): {cls}", finding_type=concept,
                        finding_site=codes.BRAIN, measurements=(probability(p),),
                        evaluations=evaluations, source_sop_instance_uids=key_uid,
                        operating_point=op))
                    if mr_point is not None:
                        notes.append(TextNote(f"{cls}: decision at "
                                              f"{describe_point(mr_point)}."))
                groups = tuple(mr_groups)
                notes.append(TextNote(
                    "Class probabilities: " + ", ".join(
                        f"{c} {percent(float(v))}" for c, v in
                        zip(brain_rules.CLASSES, probs, strict=True))))
                caption = ("Healthy / benign / malignant: " + " / ".join(
                    percent(float(v)) for v in probs))
            outcome = Analysed(groups)
            if a.result.cam is not None:
                sc_series = work.result_uid(algorithm.name, algorithm.version, "sc-series",
                                            series_uid)
                objects.append(build_secondary_capture(
                    [key], heatmap_overlay(key, a.result.cam, display=(
                        BRAIN_WINDOW_DISPLAY if modality == "CT" else None)), algorithm,
                    series_instance_uid=sc_series, sop_instance_uid=derive_uid(sc_series, 1),
                    series_description=f"AI brain tumour heatmap {modality}",
                    caption_lines=(f"Key slice of {what}", caption,
                                   "Colour: regions that raised the score (Grad-CAM)")))
        objects.insert(0, build_measurement_report(
            a.slices, outcome, algorithm, series_instance_uid=sr_series,
            sop_instance_uid=derive_uid(sr_series, 1),
            series_description=f"AI brain tumour report {modality}",
            procedure_reported=CT_HEAD if modality == "CT" else MR_BRAIN,
            notes=tuple(notes)))
        return objects

    # -- fusion -------------------------------------------------------------------------

    def _fusion(self, work: PipelineInput, analyses: Mapping[str, Sequence[Analysis]]
                ) -> tuple[list[Dataset], dict[str, Any]] | None:
        if not work.options.get("fusion", True):
            return None

        def pick(modality: str) -> Analysis | None:
            usable = [a for a in analyses[modality] if a.result is not None]
            usable.sort(key=lambda a: not a.current)  # this study's series first
            return usable[0] if usable else None

        ct, mr = pick("CT"), pick("MR")
        if ct is None or mr is None or not (ct.current or mr.current):
            return None
        name = str(work.options.get("fusion_model", FUSION_MODEL))
        try:
            model = load_model(work.models_dir, name, work.options)
        except ModelUnavailableError as exc:
            # The single-modality results stand on their own; a node without the fusion
            # package reports them and says (in the job summary and the log) why the
            # fusion did not run, instead of failing the whole study.
            log.warning("brain tumour: CT+MR fusion not run: %s", exc)
            return [], {"skipped": str(exc)}
        provenance = model.card.provenance.get("input_preprocessing", {})
        if not isinstance(provenance, Mapping) or "ct" not in provenance:
            raise PipelineError(f"model {model.card.name} names no CT input preprocessing")
        ct_spec = PreprocessSpec.from_dict(list(provenance["ct"]["steps"]))
        fingerprint = provenance["ct"].get("fingerprint")
        if fingerprint:
            ct_spec.require_fingerprint(str(fingerprint))
        ct_tensor = apply_spec(ct_spec, ct.slices)
        mr_tensor = model.preprocess(mr.slices)

        def run(c: npt.NDArray[np.float32], m: npt.NDArray[np.float32],
                presence: npt.NDArray[np.float32]) -> Mapping[str, npt.NDArray[Any]]:
            try:
                outputs: Mapping[str, npt.NDArray[Any]] = model.session.run(
                    {"ct": c, "mr": m, "presence": presence}).outputs
            except Exception as exc:
                raise PipelineError(f"model {model.card.name}: {exc}") from exc
            return outputs

        result = brain_rules.fusion_series_result(run, ct_tensor, mr_tensor)
        assert result.ct_key is not None and result.mr_key is not None
        algorithm = model.algorithm
        subject = ",".join(sorted(str(a.slices[0].SeriesInstanceUID) for a in (ct, mr)))
        sr_series = work.result_uid(algorithm.name, algorithm.version, "sr-series", subject)
        keys = {"CT": ct.slices[result.ct_key], "MR": mr.slices[result.mr_key]}
        current = [keys[m] for m, a in (("CT", ct), ("MR", mr)) if a.current]
        other = [(m, a) for m, a in (("CT", ct), ("MR", mr)) if not a.current]
        preferred = work.options.get("operating_point")
        groups: list[FindingGroup] = []
        notes = [TextNote("CT+MR fusion, reported beside the single-modality results "
                          "(not instead of them): one pass on the CT and MR key slices.")]
        for m, a in other:
            first = a.slices[0]
            notes.append(TextNote(
                f"The {m} input is from another study of the patient (study date "
                f"{first.get('StudyDate', 'unknown')}, {_label(first)})."))
        for index, (cls, concept) in enumerate(
                (("benign", BENIGN_NEOPLASM), ("malignant", MALIGNANT_NEOPLASM)), start=1):
            p = float(result.probabilities[index])
            point = _point(model, cls, str(preferred) if preferred else None)
            evaluations, op = _evaluation(concept, p, point)
            groups.append(FindingGroup(
                tracking_id=f"brain tumour (CT+MR fusion): {cls}", finding_type=concept,
                finding_site=codes.BRAIN, measurements=(probability(p),),
                evaluations=evaluations,
                source_sop_instance_uids=tuple(str(d.SOPInstanceUID) for d in current),
                operating_point=op))
        stage = int(np.argmax(result.stage_logits))
        notes.append(TextNote("Class probabilities: " + ", ".join(
            f"{c} {percent(float(v))}" for c, v in
            zip(brain_rules.CLASSES, result.probabilities, strict=True))))
        notes.append(TextNote(f"{RESEARCH} Stage proxy: {brain_rules.STAGES[stage]}; "
                              f"survival-risk proxy: {result.risk:.2f}.", concept=STAGE_PROXY))
        objects: list[Dataset] = [build_measurement_report(
            current, Analysed(tuple(groups)), algorithm, series_instance_uid=sr_series,
            sop_instance_uid=derive_uid(sr_series, 1),
            series_description="AI brain tumour report CT+MR fusion",
            procedure_reported=MR_BRAIN if mr.current else CT_HEAD, notes=tuple(notes))]
        objects += self._fusion_heatmaps(work, algorithm, subject, result, keys, ct, mr)
        summary = {"probabilities": [round(float(p), 4) for p in result.probabilities],
                   "stage_proxy": brain_rules.STAGES[stage], "risk_proxy": round(result.risk, 4),
                   "ct_current": ct.current, "mr_current": mr.current}
        return objects, summary

    @staticmethod
    def _fusion_heatmaps(work: PipelineInput, algorithm: AlgorithmInfo, subject: str,
                         result: brain_rules.FusionResult, keys: Mapping[str, Dataset],
                         ct: Analysis, mr: Analysis) -> list[Dataset]:
        sc_series = work.result_uid(algorithm.name, algorithm.version, "sc-series", subject)
        cls = brain_rules.CLASSES[result.cam_class]
        out: list[Dataset] = []
        for number, (modality, a, cam) in enumerate(
                (("CT", ct, result.ct_cam), ("MR", mr, result.mr_cam)), start=1):
            if cam is None or not a.current:
                continue
            key = keys[modality]
            out.append(build_secondary_capture(
                [key], heatmap_overlay(key, cam, display=(
                    BRAIN_WINDOW_DISPLAY if modality == "CT" else None)), algorithm,
                series_instance_uid=sc_series, sop_instance_uid=derive_uid(sc_series, number),
                series_description="AI brain tumour heatmap CT+MR fusion",
                instance_number=number, caption_lines=(
                    f"Fusion, {modality} key slice: {cls} probability "
                    f"{percent(float(result.probabilities[result.cam_class]))}",
                    "Colour: regions that raised the score (Grad-CAM)")))
        return out
