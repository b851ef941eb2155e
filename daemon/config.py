"""Settings: pydantic models of the TOML config, loading, path resolution and friendly errors.

`load_settings(path)` is the only reader; the `Settings` object is passed explicitly, never global.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from daemon.errors import ConfigError, UnknownProcessorError
from daemon.processors import known_kinds, options_model

LOCAL_CONFIG = Path("config/medbatch.toml")
SYSTEM_CONFIG = Path("/etc/medbatch/medbatch.toml")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DURATIONS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _parse_quantity(value: Any, units: dict[str, Any], what: str) -> Any:
    if not isinstance(value, str):
        return value
    match = _QUANTITY.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in units:
        raise ValueError(f"{value!r} is not a {what} (e.g. {'64MiB' if what == 'size' else '30s'})")
    return float(match.group(1)) * units[unit]


def _to_bytes(value: Any) -> Any:
    parsed = _parse_quantity(value, _UNITS, "size")
    return int(parsed) if isinstance(parsed, float) and parsed.is_integer() else parsed


def _to_seconds(value: Any) -> Any:
    return _parse_quantity(value, _DURATIONS, "duration")


Bytes = Annotated[int, BeforeValidator(_to_bytes), Field(gt=0)]
Seconds = Annotated[float, BeforeValidator(_to_seconds), Field(ge=0)]
PositiveSeconds = Annotated[float, BeforeValidator(_to_seconds), Field(gt=0)]

# Kinds whose batches hand back mergeable statistics for a rollup table.
ROLLUP_KINDS = ("emr", "genomics")
# Memory a batch needs, per byte of input, by kind (images decode to far more than their files).
DEFAULT_MEMORY_FACTOR = {"emr": 8.0, "genomics": 8.0, "imaging": 16.0}


# Kinds whose inputs carry a series and a study in their header (`batch_by`).
GROUPED_KINDS = frozenset({"imaging"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Model):
    inbox: Path = Path("../inbox")
    outbox: Path = Path("../outbox")
    state: Path = Path("../state")
    quarantine: Path = Path("../quarantine")

    @property
    def spool(self) -> Path:
        return self.state / "spool"

    @property
    def archive(self) -> Path:
        return self.state / "archive"

    @property
    def journal(self) -> Path:
        return self.state / "journal.db"

    @property
    def audit(self) -> Path:
        return self.outbox / "_audit"


class WorkersConfig(_Model):
    count: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    executor: Literal["process", "dask"] = "process"
    memory_budget: Bytes = 8 * 1024**3
    # A hard ceiling on each local worker's address space beyond what it maps once started
    # (RLIMIT_AS): a decoder bomb fails its file with MemoryError there, whatever the host.
    memory_limit: Bytes | None = None
    batch_timeout_s: PositiveSeconds = 600.0
    # Local workers run this many nice steps below the service: the main loop (claims, journal,
    # dispatch) keeps its core while they are busy. Off by default: on a host whose other
    # programs keep the cores busy, niced workers slow down and may reach batch_timeout_s.
    nice: int = Field(default=0, ge=0, le=19)
    max_attempts: int = Field(default=3, ge=1, le=20)
    scheduler_address: str | None = None
    scheduler_file: Path | None = None


class DispatchConfig(_Model):
    aging_s: PositiveSeconds = 60.0


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, host an IP literal or `localhost`; ValueError otherwise."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+|localhost):(\d{1,5})", address)
    if match is None:
        raise ValueError(f"{address!r} is not host:port (e.g. 127.0.0.1:9464 or [::1]:9464)")
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return host, port


def _check_address(value: Any) -> Any:
    if isinstance(value, str):
        parse_address(value)
    return value


Address = Annotated[str, AfterValidator(_check_address)]


class ServiceConfig(_Model):
    graceful_timeout_s: Seconds = 60.0
    rescan_s: PositiveSeconds = 30.0
    tick_s: PositiveSeconds = 0.5
    metrics_address: Address | None = None


RetentionDays = Annotated[float, Field(ge=0)]


class RetentionConfig(_Model):
    # The audit log is the compliance record: kept forever unless an operator says otherwise.
    audit_days: RetentionDays | None = None
    # How often the service looks for something to prune (it prunes only when idle).
    every_s: PositiveSeconds = 3600.0
    # Deletions per step, so that the main loop is never held long.
    step_files: int = Field(default=200, ge=1)


class Pipeline(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
    kind: str
    priority: int = Field(default=3, ge=1, le=5)
    max_files: int = Field(default=200, ge=1)
    max_bytes: Bytes = 64 * 1024**2
    max_wait: PositiveSeconds = 30.0
    settle_s: Seconds = 1.0
    max_file_bytes: Bytes = 1024**3
    # An entry with more than one name (st_nlink > 1) may be a link to a file elsewhere on the
    # filesystem: refused unless allowed here.
    allow_hard_links: bool = False
    # Only files owned by these uids are taken (None: any owner).
    allowed_uids: tuple[Annotated[int, Field(ge=0)], ...] | None = None
    # A file whose writer never closed it is taken once unchanged this long.
    max_incomplete_s: PositiveSeconds = 60.0
    memory_factor: float | None = Field(default=None, gt=0)
    # Imaging only: one batch per DICOM series or study (read from the header at claim), sealed
    # once no instance of it arrived for stable_s (max_wait stays the ceiling from the first).
    batch_by: Literal["arrival", "series", "study"] = "arrival"
    stable_s: PositiveSeconds = 10.0
    duplicates: Literal["skip", "process"] = "skip"
    after_publish: Literal["archive", "delete"] = "archive"
    # File names may carry patient names or MRNs: every published name is a keyed hash
    # (manifests, result `source`, quarantine, audit); false publishes real names.
    hash_names: bool = True
    # Retention of finished inputs and rows, in days (None: kept forever). The archive is a
    # re-run safety net of raw patient data, so it goes after 90 days by default; quarantine
    # waits for a person, and journal rows remember what was published (duplicate detection).
    archive_days: RetentionDays | None = 90.0
    quarantine_days: RetentionDays | None = None
    journal_days: RetentionDays | None = None
    # A table across batches, re-published after each one: per UTC day of publish, or all time.
    rollup: Literal["day", "all"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data: Any) -> Any:
        """Processor options live in the pipeline table too; move them aside and check them."""
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        data = dict(data)
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        kind = data.get("kind")
        if not isinstance(kind, str):
            return data
        try:
            model = options_model(kind)
        except UnknownProcessorError:
            kinds = ", ".join(known_kinds())
            raise ValueError(f"kind: unknown kind {kind!r} (known: {kinds})") from None
        try:
            data["options"] = model.model_validate(extra).model_dump(mode="json")
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None
        return data

    @model_validator(mode="after")
    def _check_rollup(self) -> Pipeline:
        if self.rollup is not None and self.kind not in ROLLUP_KINDS:
            raise ValueError(
                f"rollup: not available for kind {self.kind!r} (only {', '.join(ROLLUP_KINDS)}: "
                "their statistics merge exactly across batches)"
            )
        return self

    @property
    def estimated_memory_factor(self) -> float:
        return self.memory_factor or DEFAULT_MEMORY_FACTOR.get(self.kind, 8.0)

    @model_validator(mode="after")
    def _check_batch_by(self) -> Pipeline:
        if self.batch_by != "arrival" and self.kind not in GROUPED_KINDS:
            raise ValueError(
                f"batch_by: {self.batch_by!r} needs kind = 'imaging' (DICOM headers), "
                f"not {self.kind!r}"
            )
        return self

    @property
    def is_grouped(self) -> bool:
        """Batches follow DICOM series or studies, not arrival alone."""
        return self.batch_by != "arrival"


class Settings(_Model):
    paths: PathsConfig = PathsConfig()
    workers: WorkersConfig = WorkersConfig()
    dispatch: DispatchConfig = DispatchConfig()
    service: ServiceConfig = ServiceConfig()
    retention: RetentionConfig = RetentionConfig()
    pipeline: list[Pipeline] = Field(min_length=1)
    config_path: Path | None = None
    # SHA-256 of the config file's bytes as loaded (manifest provenance): the file an operator
    # can hash with sha256sum, comments and all, rather than a canonical form of the settings.
    config_sha256: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Settings:
        names = [p.name for p in self.pipeline]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pipeline: names must be unique ({', '.join(dupes)})")
        if self.workers.executor == "dask" and not (
            self.workers.scheduler_address or self.workers.scheduler_file
        ):
            raise ValueError(
                "workers.scheduler_address: required (or workers.scheduler_file) "
                "with executor = 'dask'"
            )
        _check_no_overlap(self.paths)
        return self


def _check_no_overlap(paths: PathsConfig) -> None:
    named = {
        key: Path(os.path.realpath(getattr(paths, key)))
        for key in ("inbox", "outbox", "state", "quarantine")
    }
    for a, pa in named.items():
        for b, pb in named.items():
            if a < b and (pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)):
                raise ValueError(
                    f"paths.{b}: overlaps paths.{a} ({pb} / {pa}); "
                    "each must be its own folder, none inside another"
                )


_NESTED_KEY = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.DOTALL)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ""
        for item in err["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        msg = err["msg"].removeprefix("Value error, ")
        nested = _NESTED_KEY.match(msg) if err["type"] == "value_error" else None
        if nested:
            loc, msg = (f"{loc}.{nested.group(1)}" if loc else nested.group(1)), nested.group(2)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _first_key(exc: ValidationError) -> str:
    text = _describe(exc)
    return text.split(":", 1)[0] if ":" in text else "config"


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    paths = raw.get("paths")
    if not isinstance(paths, dict):
        raw["paths"] = paths = {}
    for key in ("inbox", "outbox", "state", "quarantine"):
        value = paths.get(key, getattr(PathsConfig(), key))
        if isinstance(value, str | Path):
            paths[key] = Path(os.path.normpath(base / Path(value).expanduser()))
    workers = raw.get("workers")
    if isinstance(workers, dict) and isinstance(workers.get("scheduler_file"), str):
        workers["scheduler_file"] = base / workers["scheduler_file"]


def config_path_from(arg: str | Path | None) -> Path:
    """--config, else $MEDBATCH_CONFIG, else ./config/medbatch.toml if it exists, else
    /etc/medbatch/medbatch.toml; ConfigError naming all of them when none is there."""
    chosen = arg or os.environ.get("MEDBATCH_CONFIG")
    if chosen:
        return Path(chosen)
    for candidate in (LOCAL_CONFIG, SYSTEM_CONFIG):
        if candidate.exists():
            return candidate
    raise ConfigError(
        "config",
        "no config file found: give --config PATH, or set $MEDBATCH_CONFIG, or create "
        f"./{LOCAL_CONFIG} or {SYSTEM_CONFIG}",
    )


def load_settings(path: Path) -> Settings:
    """Read, resolve and validate a config; raise ConfigError naming the key."""
    try:
        data = path.read_bytes()
        raw = tomllib.loads(data.decode("utf-8"))
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    for internal in ("config_path", "config_sha256"):
        if internal in raw:
            raise ConfigError(internal, "Extra inputs are not permitted")
    _resolve_paths(raw, path.resolve().parent)
    raw["config_path"] = path.resolve()
    raw["config_sha256"] = hashlib.sha256(data).hexdigest()
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_first_key(exc), _describe(exc).split(": ", 1)[-1]) from None
