"""A stand-in for the tumour_volume pipeline, with the same result contract.

It reports a volume per study date from its route options (``volumes: {YYYYMMDD: cm3}``)
instead of segmenting, so the history loop (job completion → timeline → priors →
growth results) is tested through the real job runner without depending on a model.
The contract it shares with ``dicomnode.pipelines.tumour_volume``: the summary holds
``analysed``, ``volume_cm3``, ``study_date`` and ``tracking_uid``; the TID 1500 SR has
a group tracked as ``brain tumour`` with a patient-stable Tracking UID and a Volume in
cm3.
"""

from __future__ import annotations

from dicomnode.history.timeline import TRACKING_ID
from dicomnode.pipelines.base import PipelineInput, PipelineResult
from dicomnode.results import codes
from dicomnode.results.common import AlgorithmInfo
from dicomnode.results.sr import (
    Analysed,
    FindingGroup,
    MeasurementValue,
    NotAnalysed,
    build_measurement_report,
)
from dicomnode.results.uids import derive_uid


def patient_tracking_uid(patient_id: str) -> str:
    return derive_uid("tumour", patient_id)


class VolumeStandIn:
    name = "tumour-volume-standin"
    version = "1"

    def run(self, work: PipelineInput) -> PipelineResult:
        first = work.datasets[0]
        study_date = str(first.get("StudyDate", ""))
        volumes = dict(work.options.get("volumes", {}))
        series = work.result_uid(self.name, self.version, "sr")
        algorithm = AlgorithmInfo(self.name, self.version)
        if study_date not in volumes:
            sr = build_measurement_report(
                work.datasets, NotAnalysed("no volume known for this study date"), algorithm,
                series_instance_uid=series, sop_instance_uid=derive_uid(series, 1),
                series_description="AI tumour volume")
            return PipelineResult([sr], {}, analysed=False)
        volume = float(volumes[study_date])
        tracking_uid = patient_tracking_uid(str(first.PatientID))
        sr = build_measurement_report(
            work.datasets,
            Analysed((FindingGroup(
                TRACKING_ID, finding_type=codes.FINDING, finding_site=codes.BRAIN,
                measurements=(MeasurementValue(codes.VOLUME, volume,
                                               codes.UCUM_CUBIC_CENTIMETER),),
                tracking_uid=tracking_uid),)),
            algorithm, series_instance_uid=series, sop_instance_uid=derive_uid(series, 1),
            series_description="AI tumour volume")
        return PipelineResult([sr], {"volume_cm3": volume, "study_date": study_date,
                                     "tracking_uid": tracking_uid})
