"""Intake and spool: durable, idempotent, and strict about what becomes a file name."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from fvlm_pacs.db import Instance, Study
from fvlm_pacs.domain import InstanceRef
from fvlm_pacs.errors import InvalidInstance
from fvlm_pacs.ingest.spool import FolderSpool, validate_uid
from fvlm_pacs.service import Parts
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.helpers import encode


@pytest.mark.parametrize(
    "bad", ["", None, "1.2.3/../4", "../../etc", "1..2", "1.2.a", "1" * 65, "1.2.3 ", ".1.2"]
)
def test_validate_uid_rejects(bad: object) -> None:
    with pytest.raises(InvalidInstance):
        validate_uid(bad, "SOP Instance UID")


def test_validate_uid_accepts() -> None:
    assert validate_uid("1.2.840.10008.5.1.4.1.1.2", "x") == "1.2.840.10008.5.1.4.1.1.2"


def test_spool_store_is_atomic_and_idempotent(tmp_path: Path) -> None:
    spool = FolderSpool(tmp_path)
    ref = InstanceRef("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2")
    first = spool.store(ref, b"abc")
    assert first.changed and not first.replaced
    assert (tmp_path / "1.2/1.2.3/1.2.3.4.dcm").read_bytes() == b"abc"
    again = spool.store(ref, b"abc")
    assert not again.changed
    changed = spool.store(ref, b"abcd")
    assert changed.changed and changed.replaced
    assert not list(tmp_path.rglob("*.part"))


def test_spool_recover_removes_partial_writes(tmp_path: Path) -> None:
    spool = FolderSpool(tmp_path)
    ref = InstanceRef("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2")
    spool.store(ref, b"abc")
    leftover = tmp_path / "1.2/1.2.3/.1.2.3.5.dcm.deadbeef.part"
    leftover.write_bytes(b"half")
    found = list(spool.recover())
    assert [p.name for p in found] == ["1.2.3.4.dcm"]
    assert not leftover.exists()


def _count(parts: Parts, model: type) -> int:
    with parts.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_receive_records_and_spools(parts: Parts) -> None:
    series = ct_series(SeriesSpec(n_slices=3))
    for ds in series:
        receipt = parts.intake.receive(encode(ds), source="dimse", calling_ae_title="SCU")
        assert receipt.new
    with parts.sessions() as s:
        study = s.get(Study, series[0].StudyInstanceUID)
        assert study is not None and study.instance_count == 3
        inst = s.get(Instance, series[0].SOPInstanceUID)
        assert inst is not None and inst.calling_ae_title == "SCU"
        assert parts.spool.absolute(inst.path).read_bytes() == encode(series[0])


def test_resent_instance_is_idempotent(parts: Parts) -> None:
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    parts.intake.receive(encode(ds), source="dimse")
    again = parts.intake.receive(encode(ds), source="dimse")
    assert not again.new and not again.changed
    assert _count(parts, Instance) == 1
    with parts.sessions() as s:
        study = s.get(Study, ds.StudyInstanceUID)
        assert study is not None and study.instance_count == 1


def test_resent_instance_with_new_content_reopens_study(parts: Parts) -> None:
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    parts.intake.receive(encode(ds), source="dimse")
    with parts.sessions.begin() as s:
        study = s.get(Study, ds.StudyInstanceUID)
        assert study is not None
        study.completed_revision = study.revision  # as if its job had been created
    ds.SeriesDescription = "corrected"
    receipt = parts.intake.receive(encode(ds), source="dimse")
    assert receipt.changed and not receipt.new
    with parts.sessions() as s:
        study = s.get(Study, ds.StudyInstanceUID)
        assert study is not None and study.revision == 2 and study.instance_count == 1


def test_truncated_instance_is_refused(parts: Parts) -> None:
    data = encode(ct_series(SeriesSpec(n_slices=1))[0])
    with pytest.raises(InvalidInstance, match="truncated"):
        parts.intake.receive(data[:-100], source="dimse")
    assert _count(parts, Instance) == 0
    assert not list(parts.spool.absolute("").rglob("*.dcm"))


def test_garbage_is_refused(parts: Parts) -> None:
    with pytest.raises(InvalidInstance, match="not a readable DICOM"):
        parts.intake.receive(b"\x00" * 10 + b"hello", source="stow")


@pytest.mark.parametrize(
    ("keyword", "value", "status"),
    [
        ("SOPInstanceUID", None, 0xC001),
        ("SOPInstanceUID", "1.2.3/../../4", 0xC002),
        ("StudyInstanceUID", "../../etc", 0xC002),
        ("SeriesInstanceUID", "", 0xC001),
    ],
)
def test_bad_uids_are_refused(parts: Parts, keyword: str, value: str | None, status: int) -> None:
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    if value is None:
        del ds[keyword]
    else:
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    with pytest.raises(InvalidInstance) as info:
        parts.intake.receive(encode(ds), source="dimse")
    assert info.value.status == status
    assert not list(parts.spool.absolute("").rglob("*.dcm"))
    assert not list(parts.spool.absolute("").parent.rglob("etc"))


def test_sop_instance_reused_in_another_study_is_refused(parts: Parts) -> None:
    a = ct_series(SeriesSpec(n_slices=1))[0]
    parts.intake.receive(encode(a), source="dimse")
    b = ct_series(SeriesSpec(n_slices=1))[0]
    b.SOPInstanceUID = a.SOPInstanceUID
    b.file_meta.MediaStorageSOPInstanceUID = a.SOPInstanceUID
    with pytest.raises(InvalidInstance, match="another study"):
        parts.intake.receive(encode(b), source="dimse")
    assert _count(parts, Instance) == 1
    assert len(list(parts.spool.absolute("").rglob("*.dcm"))) == 1


def test_recover_indexes_spool_files_without_rows(parts: Parts) -> None:
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
    parts.spool.store(ref, encode(ds))  # written, then "crashed" before the DB commit
    assert parts.intake.recover() == 1
    assert parts.intake.recover() == 0
    assert _count(parts, Instance) == 1
