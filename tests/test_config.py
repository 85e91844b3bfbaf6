"""Settings: YAML file < environment < CLI flags; unknown keys and bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fvlm_pacs.cli import main
from fvlm_pacs.config import DimseDestination, load_settings
from fvlm_pacs.errors import ConfigError


def test_defaults() -> None:
    s = load_settings()
    assert s.dicom_port == 11112
    assert s.http_port == 8080
    assert s.stable_seconds == 30
    assert s.resolved_database_url.startswith("sqlite:///")
    assert s.resolved_database_url.endswith("fvlm-data/fvlm.db")


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "dicom_port: 1000\nhttp_port: 2000\nae_title: FROM_FILE\nstable_seconds: 5\n"
        "destinations:\n  - {name: pacs, kind: dimse, host: 127.0.0.1, port: 4242, ae_title: ORTHANC}\n"
    )
    monkeypatch.setenv("FVLM_PACS_HTTP_PORT", "3000")
    monkeypatch.setenv("FVLM_PACS_AE_TITLE", "FROM_ENV")
    s = load_settings(cfg, ae_title="FROM_FLAG", dicom_port=None)
    assert s.dicom_port == 1000  # file (flag not given)
    assert s.http_port == 3000  # env beats file
    assert s.ae_title == "FROM_FLAG"  # flag beats env
    assert s.stable_seconds == 5
    assert s.destinations == (
        DimseDestination(
            name="pacs", kind="dimse", host="127.0.0.1", port=4242, ae_title="ORTHANC"
        ),
    )


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.dicom_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("dicom_prot: 104\n", "dicom_prot"),
        ("dicom_port: -1\n", "dicom_port"),
        ("ae_title: 'WAY_TOO_LONG_AE_TITLE'\n", "ae_title"),
        ("stable_seconds: soon\n", "stable_seconds"),
        ("allowed_callers: [{ae_title: A, hots: x}]\n", "allowed_callers.0.hots"),
        ("destinations: [{name: x, kind: ftp}]\n", "destinations.0"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("bogus_key: 1\n")
    assert main(["db", "upgrade", "--config", str(cfg)]) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_cli_db_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert (tmp_path / "fvlm.db").exists()
    assert "database at head" in capsys.readouterr().out
