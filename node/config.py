"""Settings: one TOML file, overridden by MIGRAINE_NODE_* environment variables.

Precedence (highest first): command-line flags, environment
(``MIGRAINE_NODE_<SECTION>__<KEY>``, e.g. ``MIGRAINE_NODE_NODE__PORT=11112``),
the TOML file, the defaults below. Unknown keys are errors, and every error
names the key it is about. Built once at start-up and passed down.
"""

from __future__ import annotations

import os
import re
import tomllib
from urllib.parse import urlsplit
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node.errors import ConfigError

ENV_PREFIX = "MIGRAINE_NODE_"
CONFIG_ENV = "MIGRAINE_NODE_CONFIG"
# Not a setting: the research commands' patient-pseudonym key file (model/dataset.py).
PATIENT_KEY_ENV = "MIGRAINE_NODE_PATIENT_KEY_FILE"
# Where an installed node keeps its config (deploy/migraine-node.service); used when neither
# --config nor $MIGRAINE_NODE_CONFIG names one, so admin commands work from any folder.
DEFAULT_CONFIG_PATH = Path("/etc/migraine-node/config.toml")

Port = Annotated[int, Field(ge=1, le=65535)]


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE is at most 16 characters, no backslash or control characters;
    # leading/trailing spaces are not significant.
    stripped = value.strip()
    if not stripped or len(stripped) > 16 or "\\" in stripped or re.search(r"[\x00-\x1f]", stripped):
        raise ValueError("an AE title is 1-16 characters without backslash or control characters")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_file(value: Path | None) -> Path | None:
    if value is not None and not Path(value).is_file():
        raise ValueError(f"{value} is not a readable file")
    return value


class NodeTls(_Section):
    """DICOM TLS on the SCP (PS3.15 B.1/B.9: TLS 1.2 or newer, certificates)."""

    enabled: bool = False
    # The TLS listener (2762 is DICOM's registered port for TLS).
    port: Port = 2762
    certificate: Path | None = None  # PEM, the node's certificate (chain)
    private_key: Path | None = None  # PEM
    ca_bundle: Path | None = None  # PEM, the CAs whose client certificates are trusted
    require_client_certificate: bool = False
    # Keep the plain [node] port open beside the TLS port; false = TLS only.
    plain: bool = True
    min_version: Literal["1.2", "1.3"] = "1.2"

    _files = field_validator("certificate", "private_key", "ca_bundle")(_check_file)

    @model_validator(mode="after")
    def _complete(self) -> NodeTls:
        if self.enabled:
            missing = [k for k in ("certificate", "private_key") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"TLS needs {' and '.join(missing)}")
            if self.require_client_certificate and self.ca_bundle is None:
                raise ValueError("require_client_certificate needs ca_bundle (the CAs to trust)")
        return self


class NodeSection(_Section):
    ae_title: str = "MIGRAINE_NODE"
    # Loopback by default: opening the node to the network is a decision ("0.0.0.0" = all interfaces).
    host: str = "127.0.0.1"
    port: Port = 11112
    allowed_calling_aets: list[str] = []
    # Source networks allowed to associate (CIDR, IPv4 or IPv6); empty = any. Checked before the AE titles.
    allowed_networks: list[str] = []
    tls: NodeTls = NodeTls()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    # Processes accepting associations on `port` (SO_REUSEPORT: the kernel spreads connections over
    # them), sharing the spool and the database: concurrent senders then use more than one core.
    acceptors: Annotated[int, Field(ge=1, le=16)] = 1
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Vendor-private SOP classes accepted and kept alongside the images (a presentation context
    # is offered for each). They are never counted as slices nor read by selection or the model.
    private_sop_classes: list[str] = [
        "1.3.46.670589.11.0.0.12.1",  # Philips Private MR Spectrum Storage
        "1.3.46.670589.11.0.0.12.2",  # Philips Private MR Series Data Storage
        "1.3.46.670589.11.0.0.12.4",  # Philips Private MR Examcard Storage
    ]

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in value]

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        out = []
        for network in value:
            try:
                out.append(str(ipaddress.ip_network(network.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{network!r} is not a network such as 10.1.0.0/16 or 192.168.4.7") from None
        return out

    @field_validator("private_sop_classes")
    @classmethod
    def _check_private_sop_classes(cls, value: list[str]) -> list[str]:
        import re

        for uid in value:
            if len(uid) > 64 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid):
                raise ValueError(f"{uid!r} is not a UID")
            if uid.startswith("1.2.840.10008."):
                raise ValueError(f"{uid} is a standard DICOM UID, not a private SOP class")
        return list(dict.fromkeys(value))


class StorageSection(_Section):
    data_dir: Path = Path("migraine-node-data")
    database_url: str = ""
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024
    # Retention (storage/retention.py): spool files of a series go this many days after its result was
    # delivered everywhere (skipped series: after they were skipped). Rows stay, marked purged, so
    # `jobs` and `show` keep the history. 0 = never remove.
    retention_days: Annotated[float, Field(ge=0, le=36500)] = 30
    skipped_retention_days: Annotated[float, Field(ge=0, le=36500)] = 7
    # Audit trail rows (storage/audit.py) older than this many days are removed. 0 = keep for ever (the
    # default: how long an audit trail must be kept is the hospital's policy, often years).
    audit_retention_days: Annotated[float, Field(ge=0, le=36500)] = 0

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and "://" not in value:
            raise ValueError("expected an SQLAlchemy URL such as sqlite:////var/lib/migraine-node/node.db")
        return value

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'node.db').resolve()}"


class SeriesSection(_Section):
    idle_seconds: Annotated[float, Field(gt=0, le=86400)] = 10
    max_wait_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 1800

    @model_validator(mode="after")
    def _order(self) -> SeriesSection:
        if self.max_wait_seconds < self.idle_seconds:
            raise ValueError("max_wait_seconds must be at least idle_seconds")
        return self


class ModelSection(_Section):
    checkpoint: Path | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # What computes the forward pass (model/runtime.py): "auto" = torch on CUDA, else the fastest
    # installed CPU runtime (OpenVINO), torch if that cannot run; or force one.
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    # Without a checkpoint, `serve` uses the synthetic demo model; with [[destinations]] set it
    # refuses to start unless this says so, so demo results never reach a real PACS by accident.
    allow_synthetic_demo_model: bool = False


class WorkerSection(_Section):
    processes: Annotated[int, Field(ge=0, le=16)] = 1
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_seconds: Annotated[float, Field(ge=0, le=86400)] = 30
    # A claimed job holds a lease, renewed by its worker's heartbeat every lease_seconds / 4; a lease
    # that runs out (worker or machine gone) returns the job to the queue, counted as a failed attempt.
    lease_seconds: Annotated[float, Field(ge=5, le=3600)] = 60


class ExportSection(_Section):
    retry_initial_seconds: Annotated[float, Field(gt=0, le=3600)] = 5
    retry_max_seconds: Annotated[float, Field(gt=0, le=86400)] = 600
    max_attempts: Annotated[int, Field(ge=1, le=100000)] = 500
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30

    @model_validator(mode="after")
    def _order(self) -> ExportSection:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds must be at least retry_initial_seconds")
        return self


class MetricsSection(_Section):
    """Prometheus metrics and /healthz over HTTP (node/metrics.py)."""

    # 0 = off. Loopback by default: metrics name no patient, but they are not for every network either.
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    host: str = "127.0.0.1"


class DestinationTls(_Section):
    """DICOM TLS to a destination (export, C-GET/C-MOVE, echo)."""

    ca_bundle: Path  # PEM, the CAs that may sign the PACS's certificate
    certificate: Path | None = None  # PEM, our client certificate, for PACS that require one
    private_key: Path | None = None
    # The name the PACS's certificate must carry; default: the destination's host.
    server_name: str | None = None
    verify_hostname: bool = True

    _files = field_validator("certificate", "private_key", "ca_bundle")(_check_file)

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both certificate and private_key, or neither")
        return self


ResultKind = Literal["sr", "image"]


HTTP_HEADER_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class Destination(_Section):
    """A PACS the results go to: by DICOM (ae_title, host, port) or by DICOMweb STOW-RS (url)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    ae_title: str | None = None
    host: str | None = None
    port: Port | None = None
    # DICOMweb base URL (STOW-RS posts to <url>/studies), instead of ae_title/host/port.
    url: str | None = None
    # HTTP authentication for `url`: the secret is read at send time from the environment variable
    # `credentials_env` ("user:password" for basic, the token for bearer); never stored or logged.
    auth: Literal["none", "basic", "bearer"] = "none"
    credentials_env: str | None = None
    # How `replay --from-pacs` retrieves from this PACS: C-GET, or C-MOVE to our own AE title
    # (the PACS must know our AE title, host and port as a move destination).
    retrieve: Literal["get", "move"] = "get"
    # DICOM TLS for ae_title/host/port destinations (a DICOMweb url uses https:// instead).
    tls: DestinationTls | None = None
    # What this PACS gets: the Structured Report, and/or the result image for viewers that show no SR.
    objects: list[ResultKind] = ["sr"]

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("expected an http:// or https:// DICOMweb base URL such as http://pacs:8042/dicom-web")
        parts = urlsplit(value)
        if "@" in parts.netloc:
            raise ValueError("no user:password in url (it would show in logs); use auth and credentials_env")
        try:
            parts.port
        except ValueError:
            raise ValueError("the url's port must be 1-65535") from None
        return value.rstrip("/")

    @field_validator("credentials_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not HTTP_HEADER_ENV.fullmatch(value):
            raise ValueError("expected the name of an environment variable (letters, digits, _)")
        return value

    @field_validator("objects")
    @classmethod
    def _check_objects(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('choose at least one of "sr", "image"')
        if len(set(value)) != len(value):
            raise ValueError("each object kind may be listed once")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> Destination:
        dimse = [k for k in ("ae_title", "host", "port") if getattr(self, k) is not None]
        if self.url is not None:
            if dimse:
                raise ValueError(f"give either url (DICOMweb) or ae_title/host/port (DICOM), not both "
                                 f"(also set: {', '.join(dimse)})")
            if self.retrieve == "move":
                raise ValueError('retrieve = "move" needs a DICOM destination (ae_title/host/port)')
        elif len(dimse) != 3:
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            raise ValueError(f"a DICOM destination needs ae_title, host and port (missing: {', '.join(missing)}); "
                             "or give url for DICOMweb STOW-RS")
        if self.auth != "none" and not self.credentials_env:
            raise ValueError(f'auth = "{self.auth}" needs credentials_env, the environment variable holding the secret')
        if self.auth != "none" and self.url is None:
            raise ValueError("auth applies to a DICOMweb url only")
        if self.tls is not None and self.url is not None:
            raise ValueError("tls applies to DICOM destinations; a DICOMweb url uses https://")
        return self

    @property
    def is_dicomweb(self) -> bool:
        return self.url is not None

    def describe(self) -> str:
        """Where this destination is, for messages (never credentials)."""
        if self.url is not None:
            return f"{self.name} ({self.url})"
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    series: SeriesSection = SeriesSection()
    model: ModelSection = ModelSection()
    worker: WorkerSection = WorkerSection()
    export: ExportSection = ExportSection()
    metrics: MetricsSection = MetricsSection()
    destinations: list[Destination] = []

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique (repeated: {', '.join(dupes)})")
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
        return (_CliSource(settings_cls), env_settings, init_settings)


class _CliSource(PydanticBaseSettingsSource):
    """Command-line overrides, passed through load_settings(overrides=...)."""

    overrides: dict[str, Any] = {}

    def get_field_value(self, field, field_name):  # noqa: ANN001
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _CliSource.overrides


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: dict[str, Any], source: str) -> str:
    loc = [str(p) for p in error["loc"]]
    if loc and loc[0] == "destinations" and len(loc) > 1:
        where = f"[[destinations]] #{int(loc[1]) + 1}" + (f" {'.'.join(loc[2:])}" if len(loc) > 2 else "")
    elif len(loc) >= 2:
        where = f"[{loc[0]}] {'.'.join(loc[1:])}"
    elif loc:
        where = f"[{loc[0]}]" if loc[0] in Settings.model_fields else loc[0]
    else:
        where = "(top level)"
    if loc and loc[0] == "destinations":
        env = ENV_PREFIX + "DESTINATIONS (JSON list)"
    else:
        env = ENV_PREFIX + "__".join(p.upper() for p in loc)
    if error["type"] == "extra_forbidden":
        section = Settings.model_fields.get(loc[0]) if len(loc) > 1 else None
        allowed = ""
        if section is not None and isinstance(section.default, BaseModel):
            allowed = f" (known keys: {', '.join(type(section.default).model_fields)})"
        elif len(loc) == 1:
            return f"[{loc[0]}]: unknown section (known sections: {', '.join(Settings.model_fields)})"
        return f"{where}: unknown key{allowed}"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, str):
        given = re.sub(r"//[^/@\s]*@", "//***@", given)  # never echo a password given inside a URL
    shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    return f"{where}: {message}{shown} [set in {source} or {env}]"


def resolve_config_path(cli_value: str | Path | None) -> tuple[Path | None, str]:
    """Which config file a command uses, and why: `--config`, then $MIGRAINE_NODE_CONFIG,
    then DEFAULT_CONFIG_PATH when it exists, else none (built-in defaults).

    A named file that does not exist is still returned (load_settings says so);
    only the default location is optional.
    """
    if cli_value:
        return Path(cli_value), "from --config"
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), f"from ${CONFIG_ENV}"
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH, "from default location"
    return None, f"no --config, no ${CONFIG_ENV}, no {DEFAULT_CONFIG_PATH}"


def describe_config_source(path: Path | None, why: str) -> str:
    """The one line a command prints (on stderr) about the config it uses."""
    return f"config: {path} ({why})" if path is not None else f"config: built-in defaults ({why})"


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load and validate settings; raise ConfigError naming each bad key.

    `path` defaults to $MIGRAINE_NODE_CONFIG; with neither, built-in defaults.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    stray = sorted(
        name
        for name in os.environ
        if name.startswith(ENV_PREFIX)
        and name not in (CONFIG_ENV, PATIENT_KEY_ENV)
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in Settings.model_fields
    )
    if stray:
        raise ConfigError(
            f"unknown environment variable(s): {', '.join(stray)} "
            f"(expected {ENV_PREFIX}<SECTION>__<KEY> with SECTION one of {', '.join(Settings.model_fields)})"
        )
    saved = os.environ.pop(CONFIG_ENV, None)  # not a setting; keep it out of the env source
    _CliSource.overrides = deep_merge({}, overrides or {})
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    finally:
        _CliSource.overrides = {}
        if saved is not None:
            os.environ[CONFIG_ENV] = saved
