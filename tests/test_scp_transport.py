"""Transport features of the SCP: DICOM TLS, and compressed transfer syntaxes end to end."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from fvlm_pacs.config import TlsSettings
from fvlm_pacs.db import Instance
from fvlm_pacs.ingest.scp import StorageSCP
from fvlm_pacs.service import Parts
from fvlm_pacs.studies.assembly import assemble_series, assemble_study
from fvlm_pacs.synthetic import SeriesSpec, ct_series
from tests.helpers import c_store, require_tool


def _cert(folder: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 made with openssl (self-signed, or signed by ca)."""
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    subj = ["-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"]
    if ca is None:
        cmd = [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            *subj,
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        return key, crt
    csr = folder / f"{name}.csr"
    subprocess.run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            *subj,
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca[1]),
            "-CAkey",
            str(ca[0]),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            str(crt),
            "-copy_extensions",
            "copy",
        ],
        check=True,
        capture_output=True,
    )
    return key, crt


@pytest.fixture
def tls_scp(parts: Parts, tmp_path: Path) -> Iterator[tuple[StorageSCP, Path, tuple[Path, Path]]]:
    require_tool("openssl")
    ca = _cert(tmp_path, "test-ca")
    server_key, server_crt = _cert(tmp_path, "fvlm", ca)
    client = _cert(tmp_path, "client", ca)
    settings = parts.settings.model_copy(
        update={
            "tls": TlsSettings(cert=server_crt, key=server_key, ca=ca[1], require_client_cert=True)
        }
    )
    server = StorageSCP(settings, parts.intake, parts.sessions, parts.metrics)
    server.start()
    yield server, ca[1], client
    server.stop(grace_seconds=2)


def _store_over_tls(
    server: StorageSCP, ca_crt: Path, client: tuple[Path, Path], parts: Parts
) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
    ctx.load_cert_chain(str(client[1]), str(client[0]))
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1", server.address[1], ae_title="FVLM_PACS", tls_args=(ctx, "127.0.0.1")
    )
    assert assoc.is_established
    ds = ct_series(SeriesSpec(n_slices=1))[0]
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    with parts.sessions() as s:
        assert s.get(Instance, ds.SOPInstanceUID) is not None


def test_tls_with_client_certificate(
    tls_scp: tuple[StorageSCP, Path, tuple[Path, Path]], parts: Parts
) -> None:
    server, ca_crt, client = tls_scp
    _store_over_tls(server, ca_crt, client, parts)


def test_tls_refuses_plain_and_certificateless_peers(
    tls_scp: tuple[StorageSCP, Path, tuple[Path, Path]], parts: Parts
) -> None:
    server, ca_crt, client = tls_scp
    ae = AE(ae_title="PLAIN_SCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    ae.network_timeout = 5
    assert not ae.associate("127.0.0.1", server.address[1], ae_title="FVLM_PACS").is_established
    no_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
    assoc = ae.associate(
        "127.0.0.1", server.address[1], ae_title="FVLM_PACS", tls_args=(no_cert, "127.0.0.1")
    )
    # TLS 1.3 may report a missing client certificate only after the handshake: then the
    # association never gets established either way
    assert not assoc.is_established
    # and the server still serves a proper client afterwards
    _store_over_tls(server, ca_crt, client, parts)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_series_is_received_and_decodes_to_the_same_volume(
    scp: StorageSCP, parts: Parts, syntax: str
) -> None:
    plain = ct_series(SeriesSpec(n_slices=20, rows=32, columns=32))
    compressed = ct_series(
        SeriesSpec(n_slices=20, rows=32, columns=32),
        study_instance_uid=plain[0].StudyInstanceUID,
        frame_of_reference_uid=plain[0].FrameOfReferenceUID,
    )
    for ds in compressed:
        ds.compress(syntax)
    assert c_store(scp.address[1], compressed) == [0] * 20
    with parts.sessions() as s:
        rows = list(s.scalars(select(Instance)))
    assert {r.transfer_syntax_uid for r in rows} == {syntax}
    _choice, volume, _warnings = assemble_study(
        [parts.spool.absolute(r.path) for r in rows], parts.pipeline.stages.series_rules
    )
    reference, _ = assemble_series(plain)
    np.testing.assert_array_equal(volume.array, reference.array)
