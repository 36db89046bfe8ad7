"""The timeline cache in the ledger, its migration, and reading volumes from node SRs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicomnode.config import ConfigError, load_settings, parse_settings
from dicomnode.history.timeline import (
    TRACKING_ID,
    VolumeMeasurement,
    growth_timeline,
    measurement_from_job,
    measurements_from_report,
    record_measurement,
)
from dicomnode.ingest.ledger import SCHEMA_VERSION, InstanceRecord, Ledger, TimelineRow
from dicomnode.results import codes
from dicomnode.results.sr import (
    AlgorithmInfo,
    Analysed,
    FindingGroup,
    MeasurementValue,
    build_measurement_report,
)
from dicomnode.results.uids import derive_uid

TRACKING_UID = derive_uid("patient-stable", "lesion-1")


def mr_header(study_uid: str, study_date: str, patient_id: str = "PAT-1") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Phantom^Growth"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "MR"
    return ds


def volume_sr(source: Dataset, volume: float, tracking_uid: str = TRACKING_UID) -> Dataset:
    """A report as the tumour_volume pipeline writes it (the contract this code reads)."""
    series = derive_uid("tv-sr", source.StudyInstanceUID)
    return build_measurement_report(
        [source],
        Analysed((FindingGroup(TRACKING_ID, finding_type=codes.FINDING,
                               finding_site=codes.BRAIN,
                               measurements=(MeasurementValue(codes.VOLUME, volume,
                                                              codes.UCUM_CUBIC_CENTIMETER),),
                               tracking_uid=tracking_uid),)),
        AlgorithmInfo("tumour-volume", "1.0.0"),
        series_instance_uid=series, sop_instance_uid=derive_uid(series, 1),
        series_description="AI tumour volume")


def row(study: str, date: str, volume: float, kind: str = "node") -> TimelineRow:
    return TimelineRow("pk", TRACKING_UID, study, date, volume, f"sr-{study}", kind)


def test_a_new_study_adds_one_point_and_never_rewrites_history(
        tmp_path: Path, ledger_url: str | None) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3", url=ledger_url)
    assert ledger.add_timeline_point(row("1.1", "20250101", 4.0, "prior-sr"))
    assert ledger.add_timeline_point(row("1.2", "20250401", 6.0, "prior-sr"))
    # the same study again (a re-run, a re-retrieved prior) changes nothing
    assert not ledger.add_timeline_point(row("1.2", "20250401", 99.0, "node"))
    assert ledger.add_timeline_point(row("1.3", "20250701", 9.0))
    points = ledger.timeline_points("pk")
    assert [(p.study_uid, p.volume_cm3, p.source_kind) for p in points] == [
        ("1.1", 4.0, "prior-sr"), ("1.2", 6.0, "prior-sr"), ("1.3", 9.0, "node")]
    assert ledger.timeline_patients() == ["pk"]
    timeline = growth_timeline(points)
    assert list(timeline.days) == [0.0, 90.0, 181.0]
    with pytest.raises(ValueError, match="source kind"):
        ledger.add_timeline_point(row("1.4", "20250901", 1.0, "guess"))


def test_an_existing_version_1_ledger_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    old = Ledger(path)
    old.record_instance(InstanceRecord(
        "1.2.3.4", MRImageStorage, "1.2.3", "1.2.3.1", "pk", None, "MR", "objects/a.dcm", "ab",
        10, ExplicitVRLittleEndian, "PACS", {"Modality": "MR"}))
    old.close()
    with sqlite3.connect(path) as c:  # make it what a version-1 node left behind
        c.execute("DROP TABLE timeline_points")
        c.execute("DROP TABLE retrieve_events")
        c.execute("UPDATE meta SET value='1' WHERE key='schema'")
    ledger = Ledger(path)
    assert ledger.schema_version == SCHEMA_VERSION == 3
    assert ledger.has_instance("1.2.3.4")
    assert ledger.add_timeline_point(row("1.2.3", "20250101", 3.0))
    assert Ledger(path).timeline_points("pk")[0].volume_cm3 == 3.0  # reopening is a no-op


def test_job_summary_and_report_give_the_same_point(tmp_path: Path) -> None:
    source = mr_header("1.2.826.0.1.3680043.10.1", "20250301")
    sr = volume_sr(source, 7.25)
    outputs = [(str(sr.SOPInstanceUID), str(sr.SOPClassUID), source.StudyInstanceUID,
                "results/aa/x.dcm")]
    summary = {"analysed": True, "volume_cm3": 7.25, "study_date": "20250301",
               "tracking_uid": TRACKING_UID}
    from_job = measurement_from_job(summary, outputs, source.StudyInstanceUID)
    assert from_job == VolumeMeasurement(TRACKING_UID, source.StudyInstanceUID, "20250301",
                                         7.25, str(sr.SOPInstanceUID), "node",
                                         "results/aa/x.dcm")
    assert measurement_from_job({**summary, "analysed": False}, outputs, "x") is None
    # round trip through bytes, as a retrieved prior arrives
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    (from_sr,) = measurements_from_report(pydicom.dcmread(path), source_path="objects/b.dcm")
    assert (from_sr.tracking_uid, from_sr.volume_cm3, from_sr.study_date,
            from_sr.source_kind) == (TRACKING_UID, 7.25, "20250301", "prior-sr")
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    assert record_measurement(ledger, "pk", from_sr)
    assert not record_measurement(ledger, "pk", from_job)  # same study: one point


def test_query_settings_are_parsed_and_errors_name_file_and_key(tmp_path: Path) -> None:
    base = {"destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                      "port": 4242}}}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**base, "query": {
        "source": "pacs", "lookback_days": 400, "nightly": "01:30", "off_peak": "22:00-06:00",
        "max_moves_per_minute": 4, "retrieve": "get"}}))
    q = load_settings(good).query
    assert (q.source, q.lookback_days, q.nightly, q.off_peak, q.max_moves_per_minute,
            q.send_to, q.retrieve) == ("pacs", 400, "01:30", "22:00-06:00", 4, ("pacs",),
                                       "get")
    assert parse_settings({**base, "query": {"source": "pacs"}}).query.retrieve == \
        "move-then-get"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base, "query": {
        "source": "pacs", "nightly": "25:00", "off_peak": "22:00", "max_moves_per_minute": 0,
        "lookback_days": "long", "send_to": ["nowhere"], "reanalyse_images": "yes",
        "retrieve": "fetch"}}))
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    text = str(info.value)
    for key in ("query.nightly", "query.off_peak", "query.max_moves_per_minute",
                "query.lookback_days", "query.send_to", "query.reanalyse_images",
                "query.retrieve"):
        assert f"{bad}: {key}:" in text
