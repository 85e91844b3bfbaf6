"""One frozen settings object: YAML file < environment (``FVLM_PACS_*``) < CLI flags.

Every key is documented in README.md's configuration table. An unknown key or a bad value stops
the service at start with a :class:`~fvlm_pacs.errors.ConfigError` that names the key, instead of
surfacing later as a confusing network or database error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from fvlm_pacs.errors import ConfigError

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, ≤ 16 chars


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError("an AE title is 1-16 printable characters without a backslash")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AllowedCaller(_Frozen):
    """A calling AE title allowed to associate, optionally only from one host (IP address)."""

    ae_title: str
    host: str | None = None

    _check = field_validator("ae_title")(_check_ae_title)


class TlsSettings(_Frozen):
    """DICOM TLS (PS3.15 B.1): our certificate and key; a CA bundle to verify peers."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False


class DimseDestination(_Frozen):
    name: str
    kind: Literal["dimse"]
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str

    _check = field_validator("ae_title")(_check_ae_title)


class DicomwebDestination(_Frozen):
    name: str
    kind: Literal["dicomweb"]
    url: str
    token: SecretStr | None = None


class FolderDestination(_Frozen):
    name: str
    kind: Literal["folder"]
    path: Path


_HL7_HD = re.compile(r"^[^|^~\\&\r\n]{0,180}$")  # an HD namespace id without HL7 delimiters


def _check_hl7_name(value: str) -> str:
    value = value.strip()
    if not _HL7_HD.match(value):
        raise ValueError("HL7 application/facility names are ≤ 180 characters without | ^ ~ \\ &")
    return value


class Hl7Destination(_Frozen):
    """HL7 v2.5.1 ORU^R01 over MLLP (a RIS or interface engine): findings and triage priority.

    The application/facility names fill MSH-3..6; ``result_status`` fills OBR-25 and OBX-11
    (``F`` final, or ``P`` preliminary for a receiver that treats unverified AI output as such).
    """

    name: str
    kind: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "FVLM_PACS"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout: float = Field(30.0, gt=0, description="Connect and ACK timeout, seconds.")
    result_status: Literal["F", "P"] = "F"

    _check = field_validator(
        "sending_application", "sending_facility", "receiving_application", "receiving_facility"
    )(_check_hl7_name)


Destination = Annotated[
    DimseDestination | DicomwebDestination | FolderDestination | Hl7Destination,
    Field(discriminator="kind"),
]


class Settings(BaseSettings):
    """All settings of one fvlm_pacs process. Frozen: pass it, never mutate it."""

    model_config = SettingsConfigDict(
        env_prefix="FVLM_PACS_", extra="forbid", frozen=True, validate_default=True
    )

    ae_title: str = Field("FVLM_PACS", description="Our AE title (called AE title peers use).")
    dicom_host: str = Field("127.0.0.1", description="Address the DICOM SCP listens on.")
    dicom_port: int = Field(11112, ge=0, le=65535, description="DICOM SCP port (0 = any free).")
    http_host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 = any free).")
    data_dir: Path = Field(Path("fvlm-data"), description="Spool and SQLite database live here.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite under data_dir."
    )
    stable_seconds: float = Field(
        30.0, gt=0, description="A study idle this long is complete and gets a job."
    )
    sweep_interval_seconds: float | None = Field(
        None, gt=0, description="How often the completion sweep runs (default stable/3, ≤ 5 s)."
    )
    allowed_callers: tuple[AllowedCaller, ...] = Field(
        (), description="Calling AE titles (+ optional host) allowed; empty = accept all."
    )
    tls: TlsSettings | None = Field(None, description="DICOM TLS for the SCP; off when unset.")
    max_associations: int = Field(10, ge=1, description="Concurrent DICOM associations.")
    max_pdu_size: int = Field(
        4 * 1024 * 1024, ge=0, description="Largest P-DATA PDU we accept (0 = unlimited)."
    )
    destinations: tuple[Destination, ...] = Field((), description="Where results are sent.")
    api_tokens: tuple[SecretStr, ...] = Field(
        (), description="Bearer tokens for /api and /dicomweb; empty = no auth."
    )
    stow_max_bytes: int = Field(
        2 * 1024**3, gt=0, description="Largest STOW-RS request body accepted (bytes)."
    )
    workers: int = Field(2, ge=1, description="Worker threads in this process.")
    job_max_attempts: int = Field(5, ge=1, description="Attempts before a job is dead.")
    job_backoff_seconds: float = Field(
        30.0, ge=0, description="First retry delay; doubles per attempt."
    )
    job_lease_seconds: float = Field(
        300.0, gt=0, description="A running job whose lease is older is claimed again."
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, wait this long for running jobs before releasing."
    )
    export_lease_seconds: float = Field(
        300.0,
        gt=0,
        description="A sending export whose lease (renewed while it sends) is older is claimed "
        "again: how soon a crash mid-send is retried.",
    )
    export_max_attempts: int = Field(
        10, ge=1, description="Attempts per (result, destination) before the export is dead."
    )
    export_backoff_seconds: float = Field(
        30.0, ge=0, description="First export retry delay; doubles per attempt."
    )
    export_backoff_max_seconds: float = Field(
        3600.0, ge=0, description="Longest delay between two export attempts."
    )
    export_timeout_seconds: float = Field(
        60.0, gt=0, description="Connect/response timeout of one DIMSE or HTTP export step."
    )
    model_dir: Path | None = Field(
        None, description="fVLM model folder (our format); unset = jobs stop after assembly."
    )
    anatomy_profile: str = Field("ct-rate", description="Anatomy table profile in mappings/.")
    inference_mode: Literal["crops", "single"] = Field(
        "crops", description="One ViT pass per anatomy crop, or one for the whole context."
    )
    inference_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Image encoder arithmetic: auto = bf16 on CUDA, fp32 on CPU; bf16 on a CPU "
        "with AVX512-BF16/AMX is about 2x faster per study (bench/inference.py).",
    )
    segmentation_provider: Literal["dicom-seg", "totalsegmentator", "builtin"] = Field(
        "dicom-seg", description="Where anatomy label maps come from."
    )
    totalsegmentator_weights: Path | None = Field(
        None, description="Local TotalSegmentator v2 weights folder (never downloaded)."
    )
    totalsegmentator_device: Literal["gpu", "cpu"] = Field("cpu")
    totalsegmentator_fast: bool = Field(False)
    builtin_segmentation_dir: Path | None = Field(
        None,
        description="Weights folder of the builtin segmentation network; unset = the one "
        "shipped in the demo model (models/demo/segmentation).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")

    _check_ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        # Export rows are keyed by (result, destination name): two destinations with one name
        # would share one delivery record, and the name column holds 64 characters.
        names = [d.name for d in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique (repeated: {', '.join(dupes)})")
        if any(not n or len(n) > 64 for n in names):
            raise ValueError("a destination name is 1-64 characters")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier wins: CLI flags (init) > environment > YAML file.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fvlm.db').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outputs_dir(self) -> Path:
        """Where jobs write SR/SEG/summary; result payloads hold paths relative to it."""
        return self.data_dir / "outputs"

    @property
    def resolved_sweep_interval(self) -> float:
        if self.sweep_interval_seconds:
            return self.sweep_interval_seconds
        return max(0.2, min(5.0, self.stable_seconds / 3))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from a YAML file, the environment and explicit overrides (CLI flags).

    Overrides whose value is ``None`` are ignored, so CLI flags that were not given do not mask
    the file or the environment.
    """
    cls: type[Settings] = Settings
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ConfigError(f"config file {config_file} does not exist")

        class _FromFile(Settings):
            model_config = SettingsConfigDict(yaml_file=str(config_file))

        cls = _FromFile
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
