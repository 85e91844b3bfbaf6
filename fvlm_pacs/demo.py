"""``fvlm-pacs demo``: one synthetic chest CT through the real service, end to end, in one command.

A newcomer should see the whole product work before configuring anything: this module writes one
phantom study with its anatomy SEG (:mod:`fvlm_pacs.phantoms`), starts ``fvlm-pacs serve`` as a
subprocess on free loopback ports with a generated configuration (SQLite and folders under the
demo folder, the chosen model, ``dicom-seg`` anatomies, a ``folder`` export destination), sends
the study with our own C-STORE SCU (:class:`fvlm_pacs.export.dimse.DimseDestination`), waits —
bounded — until the job is done and its export delivered, and prints what came out.

Why a subprocess rather than the service in this process: it is exactly what ``serve`` does in
production (migrations, SCP, sweep, workers, exporter, signal handling), and stopping it cannot
leave threads behind in the caller. The subprocess gets no ``FVLM_PACS_*`` environment variables,
so a production setting in the shell (a PostgreSQL URL, a real PACS destination) can never leak
into the demo.

Layout of the demo folder (``--dir``); only a folder the demo made itself (it holds
:data:`MARKER`) is cleaned and reused, anything else must be empty or new:

=====================  ================================================================
``study/``             the phantom: ``dicom/ct/`` (CT series), ``dicom/seg.dcm`` (SEG),
                       ``report.txt`` and ``labels.json`` (the ground truth)
``data/``              the service's ``data_dir``: spool, SQLite, ``outputs/`` (SR/SEG/PNG)
``exported/``          the ``folder`` destination: ``<study>/<series>/<sop>.dcm``
``fvlm-pacs.yaml``     the generated configuration (``fvlm-pacs serve --config`` reuses it)
``serve.log``          the service's log
=====================  ================================================================
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fvlm_pacs.errors import FvlmPacsError

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("fvlm-demo")
DEFAULT_MODEL = "demo"
DEFAULT_SEED = 19
"""Seed 19 draws pleural effusion, cardiomegaly and pericardial effusion: a phantom whose truth
touches the shipped triage rules, so a good model visibly raises the priority."""
DEFAULT_TIMEOUT = 300.0
PHANTOM_SHAPE = (96, 160, 224)
PHANTOM_SPACING = (3.0, 1.5, 1.5)
"""The phantom grid (slices, rows, columns; mm): a 288 × 240 × 336 mm chest, the grid the demo
model was trained and evaluated on (:class:`fvlm_pacs.model.demo_build.DemoRecipe`'s ``shape``
and ``spacing``). On the coarser 5 × 2.5 × 2.5 mm grid used before, ``fvlm-demo 3`` missed the
pericardial effusion of seed 19 (0.415 against its threshold 0.449); on its own grid it scores it
0.93 and finds all three (with one false positive, hiatal hernia 0.22 against 0.15).
``fvlm-demo 4`` finds all three too (pericardial effusion 0.998, pleural effusion 0.30 against
0.24), with two false positives (lung nodule 0.77 against 0.73, bronchiectasis 0.28 against
0.18). ``fvlm-demo 5``, better on 200 held-out phantoms (0.833 against 0.806), finds two
(pericardial effusion 0.81 against 0.64, cardiomegaly 0.35) and misses the pleural effusion
(0.04 against 0.26), with one false positive (coronary calcification 0.16 against 0.05).
``fvlm-demo 6`` (0.848) finds the same two (pericardial effusion 0.97 against 0.80,
cardiomegaly 0.69 against 0.38), misses the pleural effusion (0.0004 against 0.013) and has one
false positive (lung nodule 0.54 against 0.50). ``fvlm-demo 7`` (0.872) finds the same two
(pericardial effusion 0.9996 against 0.9991, cardiomegaly 0.65 against 0.42), misses the pleural
effusion (0.009 against 0.057) and has no false positive; the triage is HIGH with each. One
phantom is a demonstration, not a measurement. About 1.5 s to make; the whole demo about 20 s
on two CPU cores."""
STABLE_SECONDS = 2.0
"""Idle time after the last instance before the study counts as complete (30 s in production)."""
CALLING_AE_TITLE = "FVLM_DEMO"
DESTINATION = "demo-folder"
MARKER = ".fvlm-demo"
DEFAULT_CAVEAT = "synthetic data, not for clinical use"
_OWNED = ("study", "data", "exported", "fvlm-pacs.yaml", "serve.log")
_POLL_SECONDS = 0.25
_STOP_SECONDS = 30.0


class DemoError(FvlmPacsError):
    """The demo cannot go on; ``exit_code`` 2 for bad input (model, folder), 1 for a failure."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DemoOptions:
    """What ``fvlm-pacs demo`` was asked for (see :func:`run_demo`)."""

    directory: Path = DEFAULT_DIR
    model: str = DEFAULT_MODEL
    seed: int = DEFAULT_SEED
    exit_when_done: bool = False
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class Layout:
    """Absolute paths inside the demo folder (see the module docstring)."""

    root: Path

    @property
    def study(self) -> Path:
        return self.root / "study"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def exported(self) -> Path:
        return self.root / "exported"

    @property
    def config(self) -> Path:
        return self.root / "fvlm-pacs.yaml"

    @property
    def log(self) -> Path:
        return self.root / "serve.log"


@dataclass(frozen=True)
class DemoStudy:
    """The phantom as written: its UID, the files to send and the truth to compare against."""

    study_instance_uid: str
    files: tuple[Path, ...]
    ct_slices: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    truth: dict[str, bool]


@dataclass
class Timeline:
    """Wall-clock seconds of the demo's own steps, printed next to the pipeline's stage timings."""

    steps: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = time.perf_counter() - started


# -- the demo folder and the model ---------------------------------------------------------------
def prepare_dir(directory: Path) -> Layout:
    """An absolute, clean demo folder: new, empty, or one an earlier demo made (then its own
    entries are removed, so phantom files and studies of earlier runs never mix in)."""
    root = directory.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise DemoError(f"--dir: {root} exists and is not a folder", exit_code=2)
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise DemoError(
            f"--dir: {root} is not empty and was not made by `fvlm-pacs demo`; "
            "give a new or empty folder",
            exit_code=2,
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name in _OWNED:
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        (root / MARKER).write_text("made by `fvlm-pacs demo`; its entries are rebuilt per run\n")
    except OSError as exc:
        raise DemoError(f"--dir: cannot prepare {root}: {exc}", exit_code=2) from exc
    return Layout(root)


def resolve_model(model: str) -> Path:
    """The model folder (``demo`` = the shipped demo model), checked before anything starts so a
    wrong ``--model`` is one clear line, not a service that dies during start-up."""
    from fvlm_pacs.model.checkpoint import CheckpointError, read_meta, resolve_model_path

    try:
        path = resolve_model_path(model).expanduser().resolve()
    except CheckpointError as exc:
        raise DemoError(str(exc), exit_code=2) from None
    if not path.exists():
        raise DemoError(f"--model: {path} does not exist", exit_code=2)
    if path.is_dir():
        try:
            read_meta(path)
        except CheckpointError as exc:
            raise DemoError(f"--model: {exc}", exit_code=2) from None
    return path


def model_caveat(model_dir: Path) -> str:
    """The ``caveat:`` line of the model's ``MODEL_CARD.md`` (Markdown emphasis and list marks
    allowed around it), else :data:`DEFAULT_CAVEAT` — the study is a phantom either way."""
    card = model_dir / "MODEL_CARD.md" if model_dir.is_dir() else None
    if card is not None and card.is_file():
        try:
            lines = card.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for line in lines:
            text = line.strip().lstrip("-*#> ").replace("**", "").replace("__", "").strip()
            if text.lower().startswith("caveat:") and text[7:].strip():
                return text[7:].strip()
    return DEFAULT_CAVEAT


# -- the study -----------------------------------------------------------------------------------
def make_study(seed: int, folder: Path) -> DemoStudy:
    """One phantom on :data:`PHANTOM_SHAPE` / :data:`PHANTOM_SPACING` with its anatomy SEG, in
    ``folder`` (CT files named by SOP Instance UID, new UIDs per call; the content depends on
    ``seed`` only)."""
    import pydicom

    from fvlm_pacs.phantoms import PhantomSpec, make_case, write_case

    spec = PhantomSpec(shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    case = make_case(seed, spec)
    written = write_case(case, folder, dicom=True, seg=True)
    ct = sorted(Path(written["dicom"]).glob("*.dcm"))
    files = (*ct, Path(written["seg"]))
    first = pydicom.dcmread(ct[0], stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    return DemoStudy(
        study_instance_uid=str(first.StudyInstanceUID),
        files=files,
        ct_slices=len(ct),
        shape=spec.shape,
        spacing=spec.spacing,
        truth=dict(case.findings),
    )


def send_study(study: DemoStudy, port: int, called_ae_title: str, timeout: float) -> None:
    """C-STORE every file over one association with our own export SCU (it checks each status)."""
    from fvlm_pacs import config
    from fvlm_pacs.errors import ExportError
    from fvlm_pacs.export.base import Outgoing
    from fvlm_pacs.export.dimse import DimseDestination

    peer = config.DimseDestination(
        name="demo-intake", kind="dimse", host="127.0.0.1", port=port, ae_title=called_ae_title
    )
    scu = DimseDestination(peer, calling_ae_title=CALLING_AE_TITLE, timeout=timeout)
    try:
        scu.send(Outgoing(0, study.study_instance_uid, study.files, {}))
    except ExportError as exc:
        raise DemoError(f"C-STORE to the service failed: {exc}") from exc


# -- the service ---------------------------------------------------------------------------------
def free_port() -> int:
    """A loopback port free right now (the OS picks it; the service binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_config(layout: Layout, model_dir: Path, dicom_port: int, http_port: int) -> str:
    """The YAML settings of the demo service: every path inside the demo folder, loopback only,
    and failures reported at once instead of retried with minutes of backoff."""
    import yaml

    settings: dict[str, Any] = {
        "ae_title": "FVLM_PACS",
        "dicom_host": "127.0.0.1",
        "dicom_port": dicom_port,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "data_dir": str(layout.data),
        "stable_seconds": STABLE_SECONDS,
        "model_dir": str(model_dir),
        "segmentation_provider": "dicom-seg",
        "workers": 1,
        "job_max_attempts": 1,
        "export_max_attempts": 1,
        "shutdown_grace_seconds": 10.0,
        "destinations": [{"name": DESTINATION, "kind": "folder", "path": str(layout.exported)}],
        "log_level": "INFO",
    }
    header = "# written by `fvlm-pacs demo`; `fvlm-pacs serve --config <this file>` reuses it\n"
    return header + yaml.safe_dump(settings, sort_keys=False)


class Service:
    """``fvlm-pacs serve`` in a subprocess of its own session (the terminal's Ctrl-C reaches only
    the demo, which then stops the service with SIGTERM: one controlled shutdown)."""

    def __init__(self, layout: Layout, model_dir: Path) -> None:
        self.layout = layout
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        layout.config.write_text(
            service_config(layout, model_dir, self.dicom_port, self.http_port), encoding="utf-8"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        import requests

        self.http = requests.Session()
        self.http.trust_env = False  # loopback only: never through a proxy from the environment

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FVLM_PACS_")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [
            sys.executable,
            "-m",
            "fvlm_pacs.cli",
            "serve",
            "--config",
            str(self.layout.config),
        ]
        with self.layout.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        log.debug("service started as pid %d", self.proc.pid)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise with the log's tail when the service has exited (a bad model, a taken port)."""
        if self.proc is None:
            raise DemoError("the service was not started")
        code = self.proc.poll()
        if code is not None:
            raise DemoError(
                f"the service exited with status {code}; last lines of {self.layout.log}:\n"
                + self.log_tail(),
                exit_code=2 if code == 2 else 1,
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.layout.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("  " + line for line in text.splitlines()[-lines:])

    def get(self, path: str) -> Any:
        """JSON of ``GET path``; None for 404 or while the service cannot answer yet."""
        import requests

        try:
            response = self.http.get(self.base_url + path, timeout=5)
        except requests.RequestException:
            return None
        if response.status_code != 200:
            return None
        return response.json()

    def healthy(self) -> bool:
        self.check_alive()
        return self.get("/health") is not None

    def stop(self) -> None:
        """SIGTERM (serve finishes or releases its jobs and exits 0), then SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        self.http.close()
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("service did not stop within %.0f s; killing it", _STOP_SECONDS)
            proc.kill()
            proc.wait(timeout=_STOP_SECONDS)


# -- waiting -------------------------------------------------------------------------------------
class Deadline:
    """One budget (``--timeout``) for everything the demo waits for; a timeout names the wait."""

    def __init__(self, seconds: float, log_path: Path) -> None:
        self.seconds = seconds
        self.log_path = log_path
        self.end = time.monotonic() + seconds

    def wait_for(
        self, what: Callable[[], str], predicate: Callable[[], Any], poll: float = _POLL_SECONDS
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy; ``what()`` says what is awaited
        (asked again on timeout, so it can include the latest state)."""
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= self.end:
                raise DemoError(
                    f"timed out after {self.seconds:g} s waiting for {what()} "
                    f"(service log: {self.log_path}; raise --timeout for a slow machine)"
                )
            time.sleep(poll)


@dataclass
class _Watch:
    """The latest study JSON and when each status was first seen (for the timings)."""

    service: Service
    uid: str
    study: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return str(self.study["status"]) if self.study else "not stored yet"

    def refresh(self) -> dict[str, Any] | None:
        self.service.check_alive()
        self.study = self.service.get(f"/api/studies/{self.uid}")
        return self.study

    def job_done(self) -> bool:
        self.refresh()
        if self.status == "failed":
            jobs = (self.study or {}).get("jobs") or [{}]
            raise DemoError(
                f"the job for study {self.uid} failed: {jobs[-1].get('last_error') or '?'} "
                f"(service log: {self.service.layout.log})"
            )
        return self.status == "done"

    def exports(self) -> list[dict[str, Any]]:
        return list((self.study or {}).get("exports") or [])

    def exported(self) -> bool:
        self.refresh()
        exports = self.exports()
        for e in exports:
            if e["state"] == "dead":
                raise DemoError(
                    f"export to {e['destination']} failed: {e.get('last_error') or '?'} "
                    f"(service log: {self.service.layout.log})"
                )
        return bool(exports) and all(e["state"] == "done" for e in exports)

    def export_states(self) -> str:
        states = ", ".join(f"{e['destination']} {e['state']}" for e in self.exports())
        return states or "no export row yet"


# -- printing ------------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Any:
    """A rich console (stdout, or stderr for errors); wide when not a terminal, so paths and the
    table are never wrapped in logs and captured output."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160, highlight=False)


def _findings_table(payload: dict[str, Any], truth: dict[str, bool]) -> Any:
    from rich.table import Table

    model = payload.get("model") or {}
    table = Table(title=f"fVLM findings ({model.get('name')} {model.get('version')})")
    for column in ("anatomy", "finding", "score", "threshold", "status", "phantom truth"):
        table.add_column(column, justify="right" if column in ("score", "threshold") else "left")
    for f in payload.get("findings") or []:
        score = "—" if f["score"] is None else f"{f['score']:.4g}"
        status = str(f["status"])
        shown = f"[bold red]{status}[/]" if status == "present" else status
        known = truth.get(str(f["finding"]))
        table.add_row(
            str(f["anatomy"]),
            str(f["finding"]),
            score,
            f"{f['threshold']:.4g}",
            shown,
            "—" if known is None else ("present" if known else "absent"),
        )
    return table


def _print_result(
    console: Any,
    layout: Layout,
    service: Service,
    study: DemoStudy,
    study_json: dict[str, Any],
    model_dir: Path,
    timeline: Timeline,
) -> None:
    from rich.markup import escape

    from fvlm_pacs.domain import InstanceRef
    from fvlm_pacs.ingest.spool import FolderSpool

    payload = (study_json.get("result") or {}).get("payload") or {}
    model = payload.get("model") or {}
    console.print()
    console.print(_findings_table(payload, study.truth))
    triage = payload.get("triage") or {}
    priority = str(triage.get("priority", "?"))
    colour = {"critical": "bold red", "high": "bold yellow"}.get(priority, "bold green")
    console.print(f"Triage priority: [{colour}]{priority.upper()}[/]")
    flags = triage.get("flags") or []
    for flag in flags:
        console.print(f"  flag: {escape(str(flag.get('reason') or flag))}", soft_wrap=True)
    if not flags:
        console.print("  no flags (no triage rule fired)")
    for item in triage.get("not_assessable") or []:
        rules = ", ".join(item.get("rules") or []) or "no rule"
        console.print(
            f"  not assessable: {item['finding']} ({item['anatomy']}) — unchecked: {rules}"
        )

    outputs_root = layout.data / "outputs"
    console.print("\nWritten by the job (validated before export):")
    for out in payload.get("outputs") or []:
        path = (outputs_root / str(out["path"])).resolve()
        console.print(f"  {out['kind']:<12} {escape(str(path))}", soft_wrap=True)
    spool = FolderSpool(layout.exported)
    console.print(f"Exported by the folder destination {DESTINATION!r}:")
    for out in payload.get("outputs") or []:
        if not out.get("sop_instance_uid"):
            continue  # the PNG is for people; only DICOM objects are exported
        ref = InstanceRef(
            study.study_instance_uid,
            str(out["series_instance_uid"]),
            str(out["sop_instance_uid"]),
            str(out.get("sop_class_uid") or ""),
        )
        path = (layout.exported / spool.relative_path(ref)).resolve()
        console.print(f"  {out['kind']:<12} {escape(str(path))}", soft_wrap=True)

    stages = payload.get("timings") or {}
    console.print(
        "\nPipeline stages: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in stages.items()),
        soft_wrap=True,
    )
    console.print(
        "Demo steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in timeline.steps.items()),
        soft_wrap=True,
    )
    sha = str(model.get("sha256") or "")
    console.print(
        f"\nModel: {escape(str(model.get('name')))} {escape(str(model.get('version')))} "
        f"(sha256 {sha[:12]}…) from {escape(str(model_dir))}",
        soft_wrap=True,
    )
    console.print(f"Caveat: {escape(model_caveat(model_dir))}", soft_wrap=True)
    console.print(
        f"\nWorklist:   {service.base_url}/\n"
        f"Study JSON: {service.base_url}/api/studies/{study.study_instance_uid}\n"
        f"Exports:    {service.base_url}/api/exports\n"
        f"Service log: {escape(str(layout.log))}\n"
        f"Config:     {escape(str(layout.config))} "
        "(`fvlm-pacs serve --config` it to serve this data again)",
        soft_wrap=True,
    )


# -- the command ---------------------------------------------------------------------------------
_STOP_REQUESTS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
"""Signals that end the demo like Ctrl-C: ``kill`` and a closed terminal (the service runs in
its own session, so it would not see the hang-up and would outlive the demo)."""


@contextmanager
def _shielded() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP are ignored while the service is being stopped (bounded by
    ``_STOP_SECONDS``): an interrupted stop would orphan it, as it runs in its own session."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *_STOP_REQUESTS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _stop_requests_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo like Ctrl-C, so the service subprocess is always stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_stop(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_stop) for sig in _STOP_REQUESTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(options: DemoOptions) -> int:
    """Run the demo (see the module docstring); returns the process exit status.

    0: done (with ``exit_when_done``), or stopped with Ctrl-C after the result was shown;
    2: bad input (``--model``, ``--dir``, a model the service refuses at start);
    1: anything else that failed (the job, the export, a timeout); 130: interrupted before the
    result was shown. Every path stops the service subprocess.
    """
    from rich.markup import escape

    console, errors = _console(), _console(stderr=True)
    if options.timeout <= 0:
        errors.print("fvlm-pacs demo: --timeout must be positive", style="red")
        return 2
    service: Service | None = None
    shown = False
    try:
        with _stop_requests_as_interrupt():
            model_dir = resolve_model(options.model)
            layout = prepare_dir(options.directory)
            timeline = Timeline()
            console.print(
                f"[bold]fvlm-pacs demo[/]: synthetic chest CT (seed {options.seed}) through "
                f"the real service, in {escape(str(layout.root))}",
                soft_wrap=True,
            )
            with timeline.step("phantom"):
                study = make_study(options.seed, layout.study)
            present = [k for k, v in study.truth.items() if v] or ["none"]
            console.print(
                f"  study    {study.ct_slices} CT slices {study.shape[1]}×{study.shape[2]} "
                f"({study.spacing[0]:g} mm) + anatomy SEG in {escape(str(layout.study))} "
                f"({timeline.steps['phantom']:.1f} s); phantom truth: {', '.join(present)}",
                soft_wrap=True,
            )
            service = Service(layout, model_dir)
            deadline = Deadline(options.timeout, layout.log)
            with timeline.step("start service"):
                service.start()
                deadline.wait_for(
                    lambda: f"the service to answer {service.base_url}/health", service.healthy
                )
            console.print(
                f"  service  DICOM FVLM_PACS@127.0.0.1:{service.dicom_port}, HTTP "
                f"{service.base_url} ({timeline.steps['start service']:.1f} s); "
                f"log {escape(str(layout.log))}",
                soft_wrap=True,
            )
            with timeline.step("C-STORE"):
                send_study(study, service.dicom_port, "FVLM_PACS", min(60.0, options.timeout))
            console.print(
                f"  C-STORE  {len(study.files)} instances sent as {CALLING_AE_TITLE} "
                f"({timeline.steps['C-STORE']:.1f} s)"
            )
            watch = _Watch(service, study.study_instance_uid)
            with timeline.step("complete + job"):
                deadline.wait_for(
                    lambda: f"study {study.study_instance_uid} to be done (status: {watch.status})",
                    watch.job_done,
                )
            console.print(
                f"  job      done ({timeline.steps['complete + job']:.1f} s after the last "
                f"instance, {STABLE_SECONDS:g} s of it waiting for the study to be complete)"
            )
            with timeline.step("export"):
                deadline.wait_for(
                    lambda: (
                        f"the export of study {study.study_instance_uid} ({watch.export_states()})"
                    ),
                    watch.exported,
                )
            console.print(f"  export   {watch.export_states()} ({timeline.steps['export']:.1f} s)")
            _print_result(console, layout, service, study, watch.study or {}, model_dir, timeline)
            shown = True
            if options.exit_when_done:
                return 0
            console.print(
                f"\nThe service keeps running: open [bold]{service.base_url}/[/] "
                "(Ctrl-C stops it).",
                soft_wrap=True,
            )
            while True:
                service.check_alive()
                time.sleep(0.5)
    except DemoError as exc:
        errors.print(f"fvlm-pacs demo: {exc}", style="red", markup=False, soft_wrap=True)
        return exc.exit_code
    except OSError as exc:  # the demo folder's disk: full, read-only, gone
        errors.print(f"fvlm-pacs demo: {exc}", style="red", markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        if not shown:
            errors.print("fvlm-pacs demo: interrupted", style="red")
            return 130
        return 0
    finally:
        if service is not None:
            with _shielded():
                running = service.running
                if running:
                    console.print("stopping the service …")
                service.stop()
                if running:
                    console.print("service stopped")
