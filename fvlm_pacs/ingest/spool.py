"""Durable on-disk store of received instances, keyed by UIDs.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. A write is
durable before :meth:`FolderSpool.store` returns: the bytes go to a temporary file in the target
folder, which is fsynced, atomically renamed, and the folder fsynced. A crash therefore leaves
either the complete old file, the complete new file, or a ``.part`` file that start-up removes —
never a half-written instance under its real name.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fvlm_pacs.domain import InstanceRef
from fvlm_pacs.errors import InvalidInstance

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PART_SUFFIX = ".part"


def validate_uid(value: object, name: str) -> str:
    """Return ``value`` if it is a syntactically valid UID (PS3.5 §9.1), else raise.

    Only digits and single dots, at most 64 characters: such a string can never climb out of
    the spool (no ``/``, no ``..``), so it is safe as a file name.
    """
    if value is None or value == "":
        raise InvalidInstance(f"{name} is missing", status=0xC001)
    text = str(value)
    if len(text) > 64 or not _UID.match(text):
        raise InvalidInstance(f"{name} is not a valid UID", status=0xC002)
    return text


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed; ``changed`` is False when identical bytes were already there."""

    relative_path: str
    size_bytes: int
    changed: bool
    replaced: bool


class Spool(Protocol):
    """The I/O seam for keeping received bytes; the folder implementation is the only one yet."""

    def store(self, ref: InstanceRef, data: bytes) -> StoredFile: ...

    def remove(self, relative_path: str) -> None: ...

    def absolute(self, relative_path: str) -> Path: ...

    def recover(self) -> Iterator[Path]: ...


class FolderSpool:
    """A :class:`Spool` on a local file system (fsync + atomic rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, ref: InstanceRef) -> str:
        study = validate_uid(ref.study_instance_uid, "Study Instance UID")
        series = validate_uid(ref.series_instance_uid, "Series Instance UID")
        sop = validate_uid(ref.sop_instance_uid, "SOP Instance UID")
        return f"{study}/{series}/{sop}.dcm"

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    def store(self, ref: InstanceRef, data: bytes) -> StoredFile:
        """Write ``data`` durably; idempotent for identical bytes. Raises OSError on disk failure."""
        rel = self.relative_path(ref)
        target = self.root / rel
        existed = target.exists()
        if existed and target.stat().st_size == len(data) and target.read_bytes() == data:
            return StoredFile(rel, len(data), changed=False, replaced=False)
        folder = target.parent
        new_dirs = self._make_dirs(folder)
        tmp = folder / f".{target.name}.{uuid.uuid4().hex}{PART_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, target)
        for d in [folder, *new_dirs]:
            _fsync_dir(d)
        return StoredFile(rel, len(data), changed=True, replaced=existed)

    def _make_dirs(self, folder: Path) -> list[Path]:
        """Create missing folders; return the parents whose entries changed (to fsync them)."""
        changed: list[Path] = []
        missing = []
        p = folder
        while not p.exists() and p != self.root:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            changed.append(d.parent)
        return changed

    def remove(self, relative_path: str) -> None:
        (self.root / relative_path).unlink(missing_ok=True)

    def recover(self) -> Iterator[Path]:
        """Remove leftovers of interrupted writes and yield every stored instance file.

        Start-up uses this to index files whose database row was lost (e.g. a crash between
        the rename and the commit), so nothing written is ever forgotten.
        """
        for path in self.root.glob("*/*/*"):
            if path.name.endswith(PART_SUFFIX):
                log.warning("removing interrupted spool write %s", path.name)
                path.unlink(missing_ok=True)
            elif path.suffix == ".dcm":
                yield path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
