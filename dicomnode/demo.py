"""``dicomnode demo``: the whole loop on the embedded defaults, start to finish.

Synthetic DaT-SPECT studies are put into a private Orthanc (the PACS), Orthanc forwards
them to the node with C-STORE as auto-forwarding would, the node analyses them with
``config/node.yaml``'s routes and sends the results back, and the demo prints what came
back next to the phantoms' ground truth. Without Orthanc installed, a minimal built-in
receiver stands in for the PACS and the studies are sent to the node directly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicomnode.config import DEFAULT_CONFIG, Destination, Settings, load_settings
from dicomnode.net.scu import send_files
from dicomnode.peers import Orthanc, PeerMissingError, free_port, start_orthanc, wait_for
from dicomnode.phantoms.dat_spect import write_dat_study
from dicomnode.service import Node


class _BuiltinPacs:
    """A storage SCP that keeps what it receives: the PACS when Orthanc is absent."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ae = AE(ae_title="ORTHANC")
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax)
        self.server: Any = ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.lock = threading.Lock()

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            ds.save_as(self.folder / f"{len(list(self.folder.iterdir())):05d}.dcm",
                       enforce_file_format=True)
        return 0

    def results(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.glob("*.dcm"))]

    def stop(self) -> None:
        self.server.shutdown()


def _settings(workdir: Path, node_port: int, pacs_port: int) -> Settings:
    base = load_settings(DEFAULT_CONFIG)
    node = dataclasses.replace(base.node, port=node_port, host="127.0.0.1",
                               storage=workdir / "node")
    pacs = base.destinations.get("pacs")
    destinations = {**base.destinations,
                    "pacs": Destination("pacs", pacs.ae_title if pacs else "ORTHANC",
                                        "127.0.0.1", pacs_port)}
    # the status page on a free port, so a demo never collides with a running node
    web = dataclasses.replace(base.web, port=0)
    return dataclasses.replace(base, node=node, destinations=destinations, web=web)


def _done(node: Node, studies: int) -> bool:
    counts = node.ledger.counts()
    jobs, outbox = counts["jobs"], counts["outbox"]
    finished = jobs.get("done", 0) + jobs.get("failed", 0)
    return bool(finished >= studies and not jobs.get("pending") and not jobs.get("running")
                and not outbox.get("pending") and not outbox.get("sending"))


def run_demo(workdir: Path, *, n: int = 4, seed: int = 7, timeout_s: float = 600,
             keep: bool = False) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    print(f"dicomnode demo: research use only, not for clinical use. Working in {workdir}")
    files = write_dat_study(workdir / "phantoms", n=n, seed=seed)
    truth = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        truth[str(ds.StudyInstanceUID)] = json.loads((f.parent / "truth.json").read_text())
    print(f"1. wrote {len(files)} synthetic DaT-SPECT studies (ground truth beside them)")

    orthanc: Orthanc | None = None
    builtin: _BuiltinPacs | None = None
    node_port = free_port()
    node_aet = load_settings(DEFAULT_CONFIG).node.ae_title
    try:
        try:
            orthanc = start_orthanc(workdir / "orthanc", name="dicomnode-demo-pacs",
                                    modalities={"dicomnode": [node_aet, "127.0.0.1", node_port]})
            pacs_port = orthanc.dicom_port
            print(f"2. started Orthanc as the PACS: DICOM port {pacs_port}, "
                  f"http://127.0.0.1:{orthanc.http_port}/app/explorer.html (user test/test)")
        except PeerMissingError as exc:
            builtin = _BuiltinPacs(workdir / "pacs")
            pacs_port = builtin.port
            print(f"2. {exc}; using a built-in receiver as the PACS on port {pacs_port}")
        settings = _settings(workdir, node_port, pacs_port)
        node = Node(settings)
        node.start()
        print(f"3. started the node ({settings.node.ae_title} on port {settings.node.port}) "
              f"with {DEFAULT_CONFIG}")
        try:
            if orthanc is not None:
                ids = [orthanc.post("/instances", f.read_bytes())["ParentStudy"] for f in files]
                for study_id in ids:
                    orthanc.post("/modalities/dicomnode/store", study_id.encode())
                print("4. put the studies into Orthanc and forwarded them to the node (C-STORE)")
            else:
                results = send_files(files, host="127.0.0.1", port=settings.node.port,
                                     called_aet=settings.node.ae_title, calling_aet="STORESCU")
                print(f"4. sent {sum(r.status == 0 for r in results)} studies to the node")
            started = time.monotonic()
            wait_for(lambda: _done(node, len(files)), timeout_s, "the results")
            print(f"5. analysed and delivered in {time.monotonic() - started:.1f} s")
            failures = node.ledger.failures()
            summaries = {j.study_uid: j for j in node.ledger.jobs()}
            rows = []
            for study_uid, t in truth.items():
                job = summaries.get(study_uid)
                summary = _job_summary(node, job.id) if job else {}
                rows.append((t, summary))
        finally:
            node.stop()
        _print_table(rows)
        delivered = _delivered(orthanc, builtin, truth)
        print(f"6. results in the PACS: {delivered}")
        if failures["failed_jobs"] or failures["dead_letters"]:
            print(f"failures: {failures}")
            return 1
        _render(orthanc, builtin, workdir / "results")
        print(f"   copies of the result objects (SR as HTML, SC as PNG): {workdir / 'results'}")
        if keep and orthanc is not None:
            print(f"   Orthanc keeps running: http://127.0.0.1:{orthanc.http_port}/app/explorer.html"
                  " (user test, password test); Ctrl-C to stop")
            try:
                while orthanc.proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        if orthanc is not None:
            orthanc.stop()
        if builtin is not None:
            builtin.stop()


def _job_summary(node: Node, job_id: int) -> dict[str, Any]:
    row = node.ledger._conn().execute("SELECT summary FROM jobs WHERE id=?", (job_id,)).fetchone()
    return dict(json.loads(row[0])) if row and row[0] else {}


def _print_table(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    print("\n   phantom  truth    node     putamen SBR L/R (truth)      (node)")
    for i, (t, s) in enumerate(rows):
        sbr = s.get("sbr", {})
        tsbr = t.get("sbr", {})
        print(f"   {i:7d}  {t.get('call', '?'):8} {s.get('call', 'n/a'):8} "
              f"{tsbr.get('putamen_left', 0):.2f}/{tsbr.get('putamen_right', 0):.2f}"
              f"                  {sbr.get('putamen_left', 0):.2f}/"
              f"{sbr.get('putamen_right', 0):.2f}")
    print()


def _delivered(orthanc: Orthanc | None, builtin: _BuiltinPacs | None,
               truth: dict[str, Any]) -> str:
    if orthanc is not None:
        found = orthanc.post("/tools/find", {"Level": "Series", "Expand": True,
                                              "Query": {"SeriesDescription": "AI*"}})
        studies = {s["ParentStudy"] for s in found}
        return (f"{len(found)} AI series in {len(studies)} of {len(truth)} studies "
                "(run with --keep to browse them in Orthanc Explorer)")
    results = builtin.results() if builtin else []
    return f"{len(results)} result objects received"


def _render(orthanc: Orthanc | None, builtin: _BuiltinPacs | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    datasets: list[pydicom.Dataset] = []
    if orthanc is not None:
        found = orthanc.post("/tools/find", {"Level": "Instance", "Expand": True,
                                              "Query": {"SeriesDescription": "AI*"}})
        for item in found:
            path = out / f"{item['ID']}.dcm"
            path.write_bytes(orthanc.get(f"/instances/{item['ID']}/file"))
            datasets.append(pydicom.dcmread(path))
    elif builtin is not None:
        datasets = builtin.results()
        for i, ds in enumerate(datasets):
            ds.save_as(out / f"{i:03d}.dcm", enforce_file_format=True)
    for path in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Modality == "SR" and shutil.which("dsr2html"):
            html = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True)
            path.with_suffix(".html").write_text(html.stdout)
        elif ds.Modality != "SR" and shutil.which("dcmj2pnm"):
            subprocess.run(["dcmj2pnm", "+on", str(path), str(path.with_suffix(".png"))],
                           capture_output=True)
