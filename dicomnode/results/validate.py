"""Check result objects with independent tools before they leave the node.

highdicom checks what its constructors know about; dciodvfy (dicom3tools) checks the
whole IOD as a PACS would see it, so every object is run through it before sending.
dsr2html and dcmj2pnm (DCMTK) render objects the way a viewer would, which tests use to
prove a person would actually see the values and the research-use text.

The tools are looked up when called, never at import, so the node starts (and says
clearly what is missing) on a machine without them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

_TIMEOUT_S = 60.0
_MESSAGE_LINE = re.compile(
    r"^(?:\(0x[0-9a-fA-F]{4},0x[0-9a-fA-F]{4}\)[^-]*-\s)?(?P<kind>Error|Abort|Warning)\b"
)
_TOOL_PACKAGES = {"dciodvfy": "dicom3tools", "dsr2html": "dcmtk", "dcmj2pnm": "dcmtk"}
# Patient group, accession number, physicians, institution, study ID: values of these
# must not reach logs through a validation message.
_IDENTIFYING_TAG = re.compile(
    r"\((?:0010,[0-9a-f]{4}|0008,0050|0008,0080|0008,0090|0008,1048|0008,1050|0008,1060|"
    r"0020,0010|0032,1032)\)|\b(?:Patient|Physician|Accession|Institution|StudyID)",
    re.IGNORECASE,
)
_VALUE = re.compile(r"(?<![=/])<(?!/)[^<>]*>")


class ResultToolError(RuntimeError):
    """A validation or rendering tool is missing or failed to run."""


class ResultToolMissingError(ResultToolError):
    """The tool is not installed; the message names the package that provides it."""


class ResultValidationError(ValueError):
    """dciodvfy found errors; ``errors`` holds its error lines, one per problem."""

    def __init__(self, errors: list[str], sop_class: str) -> None:
        self.errors = errors
        listed = "\n  ".join(errors)
        super().__init__(
            f"{sop_class} object failed dciodvfy with {len(errors)} error(s):\n  {listed}"
        )


@dataclass(frozen=True)
class DciodvfyReport:
    """dciodvfy's verdict: its error and warning lines (new format, with attribute paths)."""

    errors: list[str]
    warnings: list[str]
    returncode: int


def tool_path(name: str) -> str:
    """Where ``name`` is installed: on PATH, or in /usr/bin where Debian puts it."""
    found = shutil.which(name)
    if found:
        return found
    fallback = Path("/usr/bin") / name
    if fallback.is_file() and os.access(fallback, os.X_OK):
        return str(fallback)
    package = _TOOL_PACKAGES.get(name, name)
    raise ResultToolMissingError(f"{name} is not installed (install the {package} package)")


def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, capture_output=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ResultToolError(f"{Path(argv[0]).name} could not run: {exc}") from exc


def _write(ds: Dataset, directory: str, name: str) -> Path:
    path = Path(directory) / name
    ds.save_as(path, enforce_file_format=True)
    return path


def parse_dciodvfy_output(text: str) -> tuple[list[str], list[str]]:
    """Split dciodvfy output into error and warning messages.

    dciodvfy writes one message per line, "Error - ..." or "Warning - ...", sometimes
    behind a tag prefix ("(0x0010,0x0010) ... - Error - ..."), "Abort - ..." when it
    cannot go on, and in the old format indented continuation lines; anything else is
    the IOD name it recognised.
    """
    errors: list[str] = []
    warnings: list[str] = []
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line:
            continue
        if raw[:1].isspace() and current:
            current[-1] = f"{current[-1]} {line.strip()}"
        elif match := _MESSAGE_LINE.match(line):
            current = warnings if match["kind"] == "Warning" else errors
            current.append(line)
        else:
            current = None
            continue
        current[-1] = redact_identifying_values(current[-1])
    return errors, warnings


def redact_identifying_values(message: str) -> str:
    """Hide the values dciodvfy quotes for identifying attributes (e.g. a Patient's Name
    with a dubious form) while keeping attribute paths and module names."""
    if not _IDENTIFYING_TAG.search(message):
        return message
    return _VALUE.sub("<redacted>", message)


def dciodvfy_report(ds: Dataset) -> DciodvfyReport:
    """Run dciodvfy on ``ds`` (written to a private temporary file) and parse its output."""
    executable = tool_path("dciodvfy")
    with tempfile.TemporaryDirectory(prefix="dicomnode-dciodvfy-") as tmp:
        path = _write(ds, tmp, "object.dcm")
        completed = _run([executable, "-new", str(path)])
    text = (
        (completed.stdout + completed.stderr)
        .decode("utf-8", "replace")
        .replace(str(path), "<object>")
    )
    errors, warnings = parse_dciodvfy_output(text)
    if completed.returncode != 0 and not errors:
        errors.append(f"Error - dciodvfy exited with status {completed.returncode}")
    return DciodvfyReport(errors, warnings, completed.returncode)


def dciodvfy_errors(ds: Dataset) -> list[str]:
    """dciodvfy's error lines for ``ds``; empty when the object is valid."""
    return dciodvfy_report(ds).errors


def validate_result(ds: Dataset) -> None:
    """Raise ``ResultValidationError`` unless dciodvfy reports no errors for ``ds``.

    Warnings are allowed: the usual ones come from the source study (e.g. a zero
    Patient's Weight copied from the images) or from the project's private coding
    scheme, which dciodvfy cannot know.
    """
    errors = dciodvfy_errors(ds)
    if errors:
        raise ResultValidationError(errors, _sop_class_name(ds))


def render_sr_html(ds: Dataset) -> str:
    """The SR as DCMTK's dsr2html renders it (code values and units shown)."""
    executable = tool_path("dsr2html")
    with tempfile.TemporaryDirectory(prefix="dicomnode-dsr2html-") as tmp:
        path = _write(ds, tmp, "report.dcm")
        completed = _run([executable, "+U8", "+Ci", str(path)])
    if completed.returncode != 0:
        raise ResultToolError(f"dsr2html failed: {_tail(completed.stderr)}")
    return completed.stdout.decode("utf-8", "replace")


def render_sc_png(ds: Dataset) -> bytes:
    """The image as DCMTK's dcmj2pnm renders it, as PNG bytes."""
    executable = tool_path("dcmj2pnm")
    with tempfile.TemporaryDirectory(prefix="dicomnode-dcmj2pnm-") as tmp:
        path = _write(ds, tmp, "image.dcm")
        out = Path(tmp) / "image.png"
        completed = _run([executable, "--write-png", str(path), str(out)])
        if completed.returncode != 0 or not out.is_file():
            raise ResultToolError(f"dcmj2pnm failed: {_tail(completed.stderr)}")
        return out.read_bytes()


def _tail(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def _sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return str(getattr(uid, "name", uid)) if uid is not None else "unknown"
