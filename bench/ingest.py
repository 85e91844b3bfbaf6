#!/usr/bin/env python
"""DICOM C-STORE ingest throughput: fvlm_pacs against dcmtk ``storescp`` and Orthanc.

One synthetic 512×512 CT series is sent with dcmtk ``storescu`` to each receiver in turn, then
several distinct studies are sent at once (one ``storescu`` per study) to measure concurrent
associations. Every receiver runs as its own process on 127.0.0.1 with a fresh temporary data
directory; the peers are measured one after the other so they never compete for CPU or disk.

The figures are wall-clock instances per second of the ``storescu`` runs. After each run the
receiver's own count is checked (files on disk, Orthanc ``/statistics``, fvlm's database), so a
receiver that dropped instances cannot look fast. CPU is the receiver process's user + system
time while receiving; peak RSS its ``VmHWM`` (reset after start-up) from ``/proc``. Nothing
here asserts: it prints a table. See bench/README.md for how to read it.

Usage::

    python bench/ingest.py [--slices 300] [--studies 4] [--study-slices 100] [--rounds 1]
                           [--peers storescp,orthanc,fvlm] [--inprocess] [--data DIR] [--keep]

``--inprocess`` runs fvlm_pacs's StorageSCP inside this process instead of ``fvlm-pacs serve``
(no HTTP API, no RSS figure); the default is the real server as a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fvlm_pacs.synthetic import SeriesSpec, ct_series, write_series  # noqa: E402 (after sys.path)

HOST = "127.0.0.1"
CALLING_AE = "BENCHSCU"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
START_TIMEOUT = 60.0  # s a receiver may take to start answering
SEND_TIMEOUT = 900.0  # s one storescu run may take
STOP_TIMEOUT = 30.0  # s a receiver may take to exit after SIGTERM


# -- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
        body = resp.read()
    return json.loads(body) if body else None


def http_ok(url: str) -> bool:
    try:
        http_get(url, timeout=1.0)
        return True
    except (OSError, urllib.error.URLError, ValueError):
        return False


def echo_ok(port: int, ae_title: str) -> bool:
    """C-ECHO with dcmtk echoscu: the peer accepts associations."""
    result = subprocess.run(
        ["echoscu", "-aet", CALLING_AE, "-aec", ae_title, "-to", "2", HOST, str(port)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time. Only ever our own child."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -- receivers -------------------------------------------------------------------------------


class Peer:
    """One receiver under test: start, count stored instances, report its process, stop."""

    name = "?"
    durability = "?"
    ae_title = "ANY"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "peer.log"
        self._log: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        """Start the receiver. dcmtk (storescp, Orthanc's DICOM server) only disables Nagle's
        algorithm when TCP_NODELAY=1 is in its environment; without it each C-STORE response
        waits for the peer's delayed ACK (~40 ms), which would measure the TCP stack, not the
        receiver. So every receiver gets it, like storescu does."""
        self._log = open(self.log_path, "wb")
        env = dict(os.environ if env is None else env, TCP_NODELAY="1")
        self.proc = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
        )

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{log_tail(self.log_path)}"
            )

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


class StorescpPeer(Peer):
    name = "dcmtk storescp"
    durability = "no fsync at all"
    ae_title = "STORESCP"

    def start(self) -> None:
        self.out = self.workdir / "out"
        self.out.mkdir()
        self.port = free_port()
        self._spawn(["storescp", "-aet", self.ae_title, "-od", str(self.out), str(self.port)])

        def ready() -> bool:
            self._check_alive()
            return echo_ok(self.port, self.ae_title)

        wait_until(ready, START_TIMEOUT, "storescp to answer C-ECHO", step=0.2)

    def count(self) -> int:
        return count_files(self.out)


class OrthancPeer(Peer):
    name = "Orthanc"
    durability = "fsync files; SQLite index"
    ae_title = "ORTHANC"

    def start(self) -> None:
        self.port = free_port()
        self.http_port = free_port()
        config = {
            "Name": "fvlm-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "SyncStorageArea": True,  # the default since 1.7.4; explicit because we report it
            "StorageCompression": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self._spawn([ORTHANC, str(path)])

        def ready() -> bool:
            self._check_alive()
            return http_ok(f"http://{HOST}:{self.http_port}/system")

        wait_until(ready, START_TIMEOUT, "Orthanc's /system")
        self.version = str(http_get(f"http://{HOST}:{self.http_port}/system")["Version"])
        self.name = f"Orthanc {self.version}"

    def count(self) -> int:
        stats = http_get(f"http://{HOST}:{self.http_port}/statistics")
        return int(stats["CountInstances"])


def _db_count(db: Path) -> int:
    """Instances committed in fvlm's SQLite database (read-only connection)."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # schema not there yet
    finally:
        conn.close()


class FvlmServePeer(Peer):
    """``fvlm-pacs serve`` as a subprocess, the way it runs in production."""

    name = "fvlm-pacs serve"
    durability = "fsync file+dir; SQLite FULL"
    ae_title = "FVLM_PACS"

    def start(self) -> None:
        if importlib.util.find_spec("fvlm_pacs.cli") is None:
            raise RuntimeError("fvlm_pacs.cli does not exist yet; run with --inprocess")
        self.port = free_port()
        self.http_port = free_port()
        self.data_dir = self.workdir / "data"
        config = self.workdir / "fvlm.yaml"
        config.write_text(
            "\n".join(
                [
                    f"data_dir: {json.dumps(str(self.data_dir))}",
                    f"dicom_port: {self.port}",
                    f"http_port: {self.http_port}",
                    f"ae_title: {self.ae_title}",
                    "stable_seconds: 3600  # no study completes, so no job runs while we measure",
                    "",
                ]
            )
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._spawn([sys.executable, "-m", "fvlm_pacs.cli", "serve", "--config", str(config)], env)

        def ready() -> bool:
            self._check_alive()
            return http_ok(f"http://{HOST}:{self.http_port}/health")

        wait_until(ready, START_TIMEOUT, "fvlm-pacs /health")
        wait_until(lambda: echo_ok(self.port, self.ae_title), START_TIMEOUT, "fvlm C-ECHO")

    def count(self) -> int:
        return _db_count(self.data_dir / "fvlm.db")


class FvlmInProcessPeer(Peer):
    """fvlm_pacs's StorageSCP in this process: to profile it (py-spy, cProfile, yappi) or to
    measure a checkout without the CLI."""

    name = "fvlm-pacs (in-process)"
    durability = "fsync file+dir; SQLite FULL"
    ae_title = "FVLM_PACS"

    def start(self) -> None:
        from fvlm_pacs.config import load_settings
        from fvlm_pacs.db import make_engine, session_factory, upgrade
        from fvlm_pacs.ingest.intake import Intake
        from fvlm_pacs.ingest.scp import StorageSCP
        from fvlm_pacs.ingest.spool import FolderSpool
        from fvlm_pacs.metrics import Metrics

        self.data_dir = self.workdir / "data"
        settings = load_settings(data_dir=self.data_dir, dicom_port=0, ae_title=self.ae_title)
        self.engine = make_engine(settings.resolved_database_url)
        upgrade(self.engine)
        sessions = session_factory(self.engine)
        metrics = Metrics()
        intake = Intake(FolderSpool(settings.spool_dir), sessions, metrics)
        self.scp = StorageSCP(settings, intake, sessions, metrics)
        self.scp.start()
        self.port = self.scp.address[1]

    @property
    def pid(self) -> int | None:
        return None  # our own RSS holds the test data; not a meaningful figure

    def count(self) -> int:
        return _db_count(self.data_dir / "fvlm.db")

    def stop(self) -> None:
        if hasattr(self, "scp"):
            self.scp.stop()
        if hasattr(self, "engine"):
            self.engine.dispose()


# -- sending ---------------------------------------------------------------------------------


def storescu_argv(peer: Peer, folder: Path) -> list[str]:
    return ["storescu", "-aet", CALLING_AE, "-aec", peer.ae_title, HOST, str(peer.port), "+sd",
            str(folder)]  # fmt: skip


def send(peer: Peer, folders: Sequence[Path], logdir: Path, tag: str) -> float:
    """Run one storescu per folder, all at once; return the wall time until the last exits."""
    env = dict(os.environ, TCP_NODELAY="1")
    logs = [open(logdir / f"storescu-{tag}-{i}.log", "wb") for i in range(len(folders))]
    try:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                storescu_argv(peer, folder), stdout=log, stderr=subprocess.STDOUT, env=env
            )
            for folder, log in zip(folders, logs)
        ]
        deadline = time.monotonic() + SEND_TIMEOUT
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise
        elapsed = time.perf_counter() - t0
    finally:
        for log in logs:
            log.close()
    for i, proc in enumerate(procs):
        if proc.returncode != 0:
            print(f"  ! storescu {tag}-{i} exited {proc.returncode}: see {logs[i].name}")
    return elapsed


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``5`` > /proc/PID/clear_refs, Linux ≥ 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (all its threads); ours when ``pid`` is None."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measurement:
    peer: str
    durability: str
    single_s: list[float] = field(default_factory=list)
    concurrent_s: list[float] = field(default_factory=list)
    single_cpu_s: list[float] = field(default_factory=list)
    concurrent_cpu_s: list[float] = field(default_factory=list)
    idle_rss_kib: int | None = None
    peak_rss_kib: int | None = None
    problems: list[str] = field(default_factory=list)


def measure(
    peer_factory: Callable[[Path], Peer],
    workdir: Path,
    single: Path,
    studies: Sequence[Path],
    n_single: int,
    n_studies: int,
    result: Measurement,
) -> None:
    """Start a fresh receiver, send the series, then the studies at once; stop it."""
    workdir.mkdir(parents=True)
    peer = peer_factory(workdir)
    try:
        peer.start()
        result.peer = peer.name
        result.durability = peer.durability
        pid = peer.pid
        if pid is not None:
            result.idle_rss_kib = proc_status_kib(pid, "VmRSS")
            if not reset_peak_rss(pid):
                result.problems.append("could not reset VmHWM: peak includes start-up")
        for label, folders, expected, times, cpu in (
            ("single series", [single], n_single, result.single_s, result.single_cpu_s),
            ("concurrent", studies, n_studies, result.concurrent_s, result.concurrent_cpu_s),
        ):
            before = peer.count()
            cpu0 = cpu_seconds(pid)
            times.append(send(peer, folders, workdir, label.split()[0]))
            cpu.append(cpu_seconds(pid) - cpu0)
            got = peer.count() - before
            if got != expected:
                result.problems.append(f"{label}: received {got} of {expected}")
        if pid is not None:
            hwm = proc_status_kib(pid, "VmHWM")
            if hwm is not None:
                result.peak_rss_kib = max(result.peak_rss_kib or 0, hwm)
    finally:
        peer.stop()


# -- data ------------------------------------------------------------------------------------


def make_data(root: Path, slices: int, studies: int, study_slices: int) -> tuple[Path, list[Path]]:
    """One ``slices``-slice series, and ``studies`` distinct studies of ``study_slices`` each.

    Reused when ``root`` already holds data made with the same parameters.
    """
    marker = root / "params.json"
    params = {"slices": slices, "studies": studies, "study_slices": study_slices, "size": 512}
    single = root / "single"
    folders = [root / f"study{i}" for i in range(studies)]
    if marker.exists() and json.loads(marker.read_text()) == params:
        return single, folders
    for p in [single, *folders]:
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    write_series(
        ct_series(SeriesSpec(n_slices=slices, rows=512, columns=512), patient_id="BENCH"), single
    )
    for i, folder in enumerate(folders):
        spec = SeriesSpec(n_slices=study_slices, rows=512, columns=512)
        write_series(ct_series(spec, patient_id=f"BENCH{i + 1}"), folder)
    marker.write_text(json.dumps(params))
    print(f"made test data in {time.perf_counter() - t0:.1f} s under {root}")
    return single, folders


# -- report ----------------------------------------------------------------------------------


def rate(n: int, times: Sequence[float]) -> float | None:
    return n / statistics.median(times) if times else None


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def per_instance_ms(n: int, cpu: Sequence[float]) -> float | None:
    return 1000 * statistics.median(cpu) / n if cpu else None


def report(
    results: Sequence[Measurement], n_single: int, n_studies: int, studies: int, mb: float
) -> None:
    rows = []
    for r in results:
        rows.append(
            [
                r.peer,
                r.durability,
                fmt(statistics.median(r.single_s) if r.single_s else None, ".2f"),
                fmt(rate(n_single, r.single_s)),
                fmt(per_instance_ms(n_single, r.single_cpu_s), ".2f"),
                fmt(statistics.median(r.concurrent_s) if r.concurrent_s else None, ".2f"),
                fmt(rate(n_studies, r.concurrent_s)),
                fmt(per_instance_ms(n_studies, r.concurrent_cpu_s), ".2f"),
                fmt(r.idle_rss_kib / 1024 if r.idle_rss_kib else None),
                fmt(r.peak_rss_kib / 1024 if r.peak_rss_kib else None),
            ]
        )
    per_study = n_studies // max(studies, 1)
    head = [
        "receiver",
        "durable before 0x0000",
        f"1×{n_single} s",
        "inst/s",
        "CPU ms/inst",
        f"{studies}×{per_study} s",
        "inst/s",
        "CPU ms/inst",
        "idle RSS MiB",
        "peak RSS MiB",
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join((f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}") for i, w in enumerate(widths))
    print()
    print(
        f"{n_single} + {studies}×{per_study} instances, 512×512 CT, {mb:.2f} MB each, Explicit VR "
        f"Little Endian; {os.cpu_count()} CPUs; wall time of storescu; median of rounds"
    )
    print(line.format(*head))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*row))
    for r in results:
        for problem in r.problems:
            print(f"  ! {r.peer}: {problem}")

    def find(prefix: str) -> Measurement | None:
        return next((r for r in results if r.peer.lower().startswith(prefix)), None)

    fvlm = find("fvlm")
    if fvlm is not None:
        for other in (find("orthanc"), find("dcmtk")):
            if other is None:
                continue
            parts = []
            for label, n, mine, theirs in (
                ("single", n_single, fvlm.single_s, other.single_s),
                ("concurrent", n_studies, fvlm.concurrent_s, other.concurrent_s),
            ):
                a, b = rate(n, mine), rate(n, theirs)
                parts.append(f"{label} {a / b:.2f}×" if a and b else f"{label} -")
            print(f"fvlm / {other.peer}: " + ", ".join(parts))
    print(
        textwrap.fill(
            "notes: dcmtk storescp writes without fsync (page cache only): a ceiling, not a "
            "durable peer. Orthanc fsyncs each stored file (SyncStorageArea) and indexes it in "
            "SQLite; it negotiates 16 KiB PDUs (MaximumPduLength default). fvlm fsyncs each "
            "file, renames it, fsyncs its folder and commits the row (SQLite synchronous=FULL) "
            "before answering 0x0000. storescu and the dcmtk receivers run with TCP_NODELAY=1 "
            "(without it dcmtk waits for delayed ACKs, ~40 ms per instance). CPU = user+system "
            "time of the receiver process while receiving (storescu not included); peak RSS = "
            "VmHWM reset after start-up, so it covers receiving only.",
            width=100,
        )
    )


# -- main ------------------------------------------------------------------------------------

PEERS: dict[str, Callable[[Path], Peer]] = {
    "storescp": StorescpPeer,
    "orthanc": OrthancPeer,
    "fvlm": FvlmServePeer,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=300, help="slices of the single series")
    p.add_argument("--studies", type=int, default=4, help="studies sent concurrently")
    p.add_argument("--study-slices", type=int, default=100, help="slices per concurrent study")
    p.add_argument("--rounds", type=int, default=1, help="repeat with fresh receivers; median")
    p.add_argument("--peers", default="storescp,orthanc,fvlm", help="comma-separated subset")
    p.add_argument("--inprocess", action="store_true", help="fvlm SCP in this process")
    p.add_argument("--data", type=Path, help="keep/reuse generated test data in this folder")
    p.add_argument("--keep", action="store_true", help="keep temporary folders")
    return p.parse_args(argv)


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="fvlm-bench-"))
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = set(names) - set(PEERS)
    if unknown:
        print(f"unknown peers: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    factories = dict(PEERS)
    if args.inprocess:
        factories["fvlm"] = FvlmInProcessPeer
    with workspace(args.keep) as root:
        data_root = args.data or root / "data"
        data_root.mkdir(parents=True, exist_ok=True)
        single, folders = make_data(data_root, args.slices, args.studies, args.study_slices)
        n_single = args.slices
        n_studies = args.studies * args.study_slices
        mb = sum(p.stat().st_size for p in single.iterdir()) / max(n_single, 1) / 1e6
        results = {name: Measurement(peer=name, durability="") for name in names}
        for rnd in range(args.rounds):
            for name in names:
                print(f"round {rnd + 1}/{args.rounds}: {name} …", flush=True)
                try:
                    measure(
                        factories[name],
                        root / f"{name}-{rnd}",
                        single,
                        folders,
                        n_single,
                        n_studies,
                        results[name],
                    )
                except Exception as exc:  # report and go on with the other receivers
                    results[name].problems.append(f"{type(exc).__name__}: {exc}")
                if not args.keep:  # free the page cache for the next receiver, fair to all
                    shutil.rmtree(root / f"{name}-{rnd}", ignore_errors=True)
        report(list(results.values()), n_single, n_studies, args.studies, mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
