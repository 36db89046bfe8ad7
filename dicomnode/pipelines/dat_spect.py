"""DaT-SPECT striatal binding quantification, served as a node pipeline.

The quantitative half of seed 000 done the way nuclear-medicine software does it
(specific binding ratios over standard striatal regions against an occipital
reference, as DaTQUANT and BRASS report them), instead of the seed's ad hoc
"centre intensity" blend. The algorithm itself lives in ``dat_quant``; this module only
checks inputs and turns the numbers into DICOM results: a TID 1500 SR and one
Secondary Capture of the striatal slab with the regions drawn and the ratios written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.imaging import apply_spec
from dicomnode.inference.aggregate import sigmoid
from dicomnode.inference.package import OperatingPoint
from dicomnode.pipelines import dat_quant
from dicomnode.pipelines.base import PipelineInput, PipelineResult
from dicomnode.pipelines.dat_slab import dat_slab
from dicomnode.pipelines.learned import (
    ABSENT,
    PRESENT,
    ServedModel,
    describe_point,
    load_model,
    sr_operating_point,
)
from dicomnode.results import codes
from dicomnode.results.common import AlgorithmInfo
from dicomnode.results.sc import build_secondary_capture, draw_regions
from dicomnode.results.sr import (
    Analysed,
    Evaluation,
    FindingGroup,
    MeasurementValue,
    NotAnalysed,
    Outcome,
    Predecessor,
    TextNote,
    build_measurement_report,
    probability,
)
from dicomnode.results.uids import derive_uid

log = logging.getLogger(__name__)

SBR = codes.local_code("DN-SBR", "Specific binding ratio")
PUTAMEN_CAUDATE_RATIO = codes.local_code("DN-PCR", "Putamen to caudate ratio")
ASYMMETRY_INDEX = codes.local_code("DN-AI", "Asymmetry index")
REDUCED_UPTAKE = codes.local_code("DN-DAT-REDUCED", "Reduced striatal dopamine transporter "
                                  "binding")

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
_COLOURS = {"caudate_left": (0, 220, 0), "caudate_right": (0, 220, 0),
            "putamen_left": (255, 220, 0), "putamen_right": (255, 220, 0)}
MIN_SLICES = 24

_REGIONS: dict[str, tuple[Code, Code]] = {
    "caudate_left": (codes.CAUDATE_NUCLEUS, codes.LEFT),
    "caudate_right": (codes.CAUDATE_NUCLEUS, codes.RIGHT),
    "putamen_left": (codes.PUTAMEN, codes.LEFT),
    "putamen_right": (codes.PUTAMEN, codes.RIGHT),
    "striatum_left": (codes.CORPUS_STRIATUM, codes.LEFT),
    "striatum_right": (codes.CORPUS_STRIATUM, codes.RIGHT),
}


def input_problem(datasets: Sequence[Dataset]) -> str | None:
    """Why this series is not something the quantification was built for, if it is not."""
    if not datasets:
        return "the series holds no instances"
    if any(str(ds.get("Modality", "")) != "NM" for ds in datasets):
        return "not a nuclear medicine (NM) series"
    if any(str(ds.get("SOPClassUID", "")) != NM_STORAGE for ds in datasets):
        return "not stored as NM Image Storage"
    image_type = [str(v).upper() for v in (datasets[0].get("ImageType") or [])]
    if "RECON TOMO" not in image_type and "TOMO" not in image_type:
        return "not a reconstructed tomographic (SPECT) image (ImageType lacks RECON TOMO)"
    slices = len(datasets)
    if slices == 1:
        slices = int(datasets[0].get("NumberOfFrames", 1) or 1)
    if slices < MIN_SLICES:
        return f"only {slices} slices; at least {MIN_SLICES} are needed to cover the striata"
    return None


@dataclass(frozen=True)
class ClassifierCall:
    model: ServedModel
    p: float
    point: OperatingPoint
    call: str  # "reduced" or "normal", the words dat_quant uses


def classify(model: ServedModel, volume: np.ndarray, spacing: Sequence[float],
             preferred: object = None) -> ClassifierCall:
    """The CNN + BiLSTM on the slab around the striata, through the card's spec."""
    slab = dat_slab(volume, spacing)
    tensor = apply_spec(model.spec, slab[np.newaxis])
    outputs = model.run(tensor)
    name = next(o.name for o in model.card.outputs if o.kind == "logits")
    logit = float(np.asarray(outputs[name], dtype=np.float64).reshape(-1)[0])
    p = float(sigmoid(np.asarray([logit]))[0])
    point = model.operating_point(str(preferred) if preferred else None, ("f1-optimal",))
    return ClassifierCall(model, p, point, "reduced" if p >= point.threshold else "normal")


class DatSpectPipeline:
    name = "dicomnode DaT SBR"
    version = "1.0.0"
    series_description_sr = "AI DaT-SPECT binding ratios"
    series_description_sc = "AI DaT-SPECT striatal regions"

    def run(self, work: PipelineInput) -> PipelineResult:
        algorithm = AlgorithmInfo(
            self.name, self.version, None,
            parameters=(f"call: reduced when the lower putamen SBR < "
                        f"{dat_quant.PUTAMEN_SBR_CUTOFF:g} (phantom-calibrated)",
                        "reference region: occipital cortex",
                        "SBR = (mean region counts - mean reference) / mean reference"))
        sources = list(work.datasets)
        sr_series = work.result_uid(self.name, self.version, "sr-series")
        sc_series = work.result_uid(self.name, self.version, "sc-series")
        predecessors: tuple[Predecessor, ...] = ()
        if work.generation > 0:
            previous = work.result_uid(self.name, self.version, "sr-series",
                                       generation=work.generation - 1)
            predecessors = (Predecessor(previous, derive_uid(previous, 1)),)

        problem = input_problem(sources)
        quant: dat_quant.DatQuantResult | None = None
        if problem is None:
            try:
                volume, spacing = dat_quant.load_volume(sources)
                quant = dat_quant.quantify(volume, spacing)
            except dat_quant.QuantificationError as exc:
                problem = str(exc)

        notes = [TextNote("Ratios and cut-off are calibrated on synthetic phantoms; they are "
                          "not a clinical reference range.")]
        objects: list[Dataset] = []
        summary: dict[str, object]
        classifier: ClassifierCall | None = None
        if quant is None:
            assert problem is not None
            outcome: Outcome = NotAnalysed(f"Not analysed: {problem}.")
            summary = {"analysed": False, "reason": problem}
        else:
            outcome = Analysed(tuple(self._findings(quant, sources)))
            summary = {"analysed": True, "call": quant.call,
                       "sbr": {k: round(v, 3) for k, v in quant.sbr.items()},
                       "putamen_caudate_ratio": round(quant.putamen_caudate_ratio, 3),
                       "asymmetry_index_putamen": round(quant.asymmetry_index_putamen, 1)}
            model_name = work.options.get("classifier")
            if model_name:
                classifier = classify(
                    load_model(work.models_dir, str(model_name), work.options), volume,
                    spacing, work.options.get("operating_point"))
                summary["classifier"] = {"probability_reduced": round(classifier.p, 4),
                                         "call": classifier.call,
                                         "agrees": classifier.call == quant.call}
        objects.append(build_measurement_report(
            sources, outcome, algorithm, series_instance_uid=sr_series,
            sop_instance_uid=derive_uid(sr_series, 1),
            series_description=self.series_description_sr, procedure_reported=codes.SPECT_BRAIN,
            notes=tuple(notes), predecessors=predecessors))
        if classifier is not None and quant is not None:
            objects.append(self._classifier_report(work, classifier, quant, sources))
        if quant is not None:
            objects.append(build_secondary_capture(
                sources, self._picture(quant), algorithm, series_instance_uid=sc_series,
                sop_instance_uid=derive_uid(sc_series, 1),
                series_description=self.series_description_sc,
                caption_lines=self._caption(quant)))
        return PipelineResult(objects, summary, analysed=quant is not None)

    @staticmethod
    def _classifier_report(work: PipelineInput, c: ClassifierCall,
                           quant: dat_quant.DatQuantResult, sources: Sequence[Dataset]
                           ) -> Dataset:
        """The learned classifier's SR, its own series: reported beside the binding
        ratios, never blended with them (seed 000's fixed 70/30 blend is the
        anti-pattern); when the two calls differ, the SR says so."""
        algorithm = c.model.algorithm
        series = work.result_uid(algorithm.name, algorithm.version, "sr-series")
        refs = tuple(str(ds.SOPInstanceUID) for ds in sources)
        reduced = c.call == "reduced"
        group = FindingGroup(
            tracking_id="DaT classifier", finding_type=REDUCED_UPTAKE,
            finding_site=codes.CORPUS_STRIATUM, laterality=codes.BILATERAL,
            measurements=(probability(c.p),),
            evaluations=(Evaluation(REDUCED_UPTAKE, PRESENT if reduced else ABSENT),),
            source_sop_instance_uids=refs, operating_point=sr_operating_point(c.point))
        if c.call == quant.call:
            agreement = (f"AGREEMENT: the classifier ({c.call}) and the binding ratios "
                         f"({quant.call}) give the same call.")
        else:
            agreement = (f"DISAGREEMENT: the classifier calls the scan {c.call.upper()} but "
                         f"the binding ratios call it {quant.call.upper()} (lower putamen "
                         f"SBR {min(quant.sbr['putamen_left'], quant.sbr['putamen_right']):.2f}"
                         f", cut-off {dat_quant.PUTAMEN_SBR_CUTOFF:g}); review the images.")
        notes = (TextNote(agreement),
                 TextNote(f"Decision at {describe_point(c.point)}."),
                 TextNote("The two results are reported side by side and never combined; "
                          "the binding-ratio report is a separate SR in this study."))
        return build_measurement_report(
            sources, Analysed((group,)), algorithm, series_instance_uid=series,
            sop_instance_uid=derive_uid(series, 1),
            series_description="AI DaT-SPECT classifier", series_number=902,
            procedure_reported=codes.SPECT_BRAIN, notes=notes)

    @staticmethod
    def _findings(q: dat_quant.DatQuantResult, sources: Sequence[Dataset]
                  ) -> list[FindingGroup]:
        refs = tuple(str(ds.SOPInstanceUID) for ds in sources)
        groups: list[FindingGroup] = []
        for key, (site, side) in _REGIONS.items():
            groups.append(FindingGroup(
                tracking_id=key.replace("_", " "), finding_type=codes.FINDING,
                finding_site=site, laterality=side,
                measurements=(MeasurementValue(SBR, q.sbr[key], codes.UCUM_RATIO,
                                               derivation=codes.MEAN),),
                source_sop_instance_uids=refs))
        normality = codes.NORMAL if q.call == "normal" else codes.ABNORMAL
        groups.append(FindingGroup(
            tracking_id="striatal binding", finding_type=codes.FINDING,
            finding_site=codes.CORPUS_STRIATUM, laterality=codes.BILATERAL,
            measurements=(
                MeasurementValue(PUTAMEN_CAUDATE_RATIO, q.putamen_caudate_ratio,
                                 codes.UCUM_RATIO),
                MeasurementValue(ASYMMETRY_INDEX, q.asymmetry_index_putamen, codes.UCUM_PERCENT,
                                 finding_site=codes.PUTAMEN),
                MeasurementValue(ASYMMETRY_INDEX, q.asymmetry_index_caudate, codes.UCUM_PERCENT,
                                 finding_site=codes.CAUDATE_NUCLEUS),
            ),
            evaluations=(Evaluation(codes.NORMALITY, normality),),
            source_sop_instance_uids=refs))
        return groups

    @staticmethod
    def _picture(q: dat_quant.DatQuantResult, width: int = 512) -> np.ndarray:
        """The slab enlarged smoothly to ``width`` with the regions outlined at that size.

        The slab is a few dozen voxels across; drawing on it and then enlarging would
        give blocky outlines and unreadable labels, so the picture is enlarged first.
        """
        slab = np.asarray(q.slab, dtype=np.float32)
        height = max(1, round(slab.shape[0] * width / slab.shape[1]))
        big = cv2.resize(slab, (width, height), interpolation=cv2.INTER_CUBIC)
        top = float(np.percentile(big, 99.5)) or 1.0
        grey = np.clip(big / top * 255.0, 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        masks = {k: cv2.resize(m.astype(np.uint8), (width, height),
                               interpolation=cv2.INTER_NEAREST).astype(bool)
                 for k, m in q.regions_2d.items() if k in _COLOURS}
        colours = {k: _COLOURS[k] for k in masks}
        labels = {k: f"{'R' if k.endswith('right') else 'L'} {q.sbr.get(k, 0.0):.2f}"
                  for k in masks}
        return draw_regions(rgb, masks, colours, labels)

    @staticmethod
    def _caption(q: dat_quant.DatQuantResult) -> list[str]:
        s = q.sbr
        return [
            f"SBR putamen L {s['putamen_left']:.2f} R {s['putamen_right']:.2f}; "
            f"caudate L {s['caudate_left']:.2f} R {s['caudate_right']:.2f}",
            f"Putamen/caudate {q.putamen_caudate_ratio:.2f}; putamen asymmetry "
            f"{q.asymmetry_index_putamen:.0f} %; call: {q.call.upper()}",
            "Outlines: caudate green, putamen yellow; labels are SBRs. "
            "Image left = patient right.",
        ]
