from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomnode.config import DEFAULT_CONFIG, ConfigError, load_settings

REPO = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_embedded_default_is_valid() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.node.ae_title == "DICOMNODE"
    assert [r.name for r in settings.routes][:2] == ["dat-spect", "pneumonia-cxr"]
    assert not settings.security.allow_any_caller


def test_every_problem_is_reported_with_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, {
        "node": {"ae_title": "THIS-AE-TITLE-IS-TOO-LONG", "port": 70000, "colour": "red"},
        "security": {"allowed_callers": [{"ae_title": "PACS"}]},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "h"}},
        "routes": [{"name": "r", "match": {"Modalityy": "NM", "Rows": {"min": "x"}},
                    "pipeline": "nope", "send_to": ["elsewhere"]}],
    })
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    for fragment in ("node.ae_title", "node.port", "node.colour: unknown key",
                     "security.allowed_callers[0]: needs both", "destinations.pacs.port: missing",
                     "routes[0] (r).match.Modalityy: not a DICOM keyword",
                     "routes[0] (r).match.Rows: min must be a number",
                     "routes[0] (r).pipeline: unknown pipeline 'nope'",
                     "routes[0] (r).send_to: unknown destination 'elsewhere'"):
        assert fragment in text, fragment
    assert all(line.startswith(str(path)) for line in info.value.problems)


def test_empty_allow_list_admits_nobody(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"security": {"allowed_callers": []}}))
    assert not settings.security.caller_allowed("ANY", "127.0.0.1")
    anyone = load_settings(write(tmp_path, {"security": {"allow_any_caller": True}}))
    assert anyone.security.caller_allowed("ANY", "10.1.2.3")


def test_caller_rule_needs_title_and_address(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"security": {"allowed_callers": [
        {"ae_title": "PACS", "host": "10.0.0.0/24"}]}}))
    sec = settings.security
    assert sec.caller_allowed("PACS", "10.0.0.17")
    assert not sec.caller_allowed("PACS", "10.0.1.17")
    assert not sec.caller_allowed("OTHER", "10.0.0.17")


def test_check_config_cli_reports_errors_in_one_line_each(tmp_path: Path) -> None:
    path = write(tmp_path, {"node": {"port": "eleven"}, "jobs": {"workers": 0}})
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", "--config",
                          str(path)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in out.stderr
    assert "node.port" in out.stderr and "jobs.workers" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", "--config",
                         str(DEFAULT_CONFIG)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "OK" in ok.stdout


def test_scale_out_settings_name_their_key(tmp_path: Path) -> None:
    from dicomnode.config import parse_settings

    settings = parse_settings({"ledger": {"url": "postgresql+psycopg://node@db:5432/dicomnode"},
                               "jobs": {"engine": "celery", "broker": "redis://q:6379/0"},
                               "node": {"storage": "/var/node", "spool": "/mnt/spool"}})
    assert settings.jobs.engine == "celery" and settings.spool_root == Path("/mnt/spool")
    assert "node@db" not in repr(settings)  # URLs may carry passwords
    assert parse_settings({}).ledger.url is None and parse_settings({}).jobs.engine == \
        "in-process"
    with pytest.raises(ConfigError) as err:
        parse_settings({"ledger": {"url": "mysql://u:secret@h/db"},
                        "jobs": {"engine": "celery"}})
    problems = "\n".join(err.value.problems)
    assert "ledger.url" in problems and "jobs.broker" in problems
    assert "secret" not in problems
