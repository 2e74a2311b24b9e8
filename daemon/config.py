"""Daemon configuration: where it listens, who may call it, what it refuses, where it keeps data.

One merge order, highest first: command-line flags (the `overrides` of `load_config`), then the
config file, then the embedded defaults of `DaemonConfig` (which `configs/default.yaml` spells out
in full; a test keeps the two equal). Nested sections merge key by key; lists (auth.tokens) are
replaced whole.

Invariants:
- unknown keys and bad values are errors naming the field path and what is allowed, and the source
  that set them (the file, or "command line"); a typo never falls back to a default;
- every string in the file may use ${VAR} or ${VAR:-default}; an unset variable without a default
  is an error, never a literal "${VAR}" that would end up as a folder name or a token hash;
- relative paths (data_dir, tls.*) are relative to the daemon's working directory, whichever
  source set them, so a flag and the same value in the file mean the same folder;
- tokens are stored as the sha256 of the token, never in clear, and `redacted_dict` hides even the
  hashes (a weak token's hash can be brute-forced);
- a listen address that is not loopback (or a unix socket) needs callers to prove who they are:
  auth.require with at least one token, or mTLS (tls.client_ca). Otherwise `load_config` raises
  ConfigError and the daemon does not start. The check lives in `check_exposure` so a config built
  in code can be checked the same way.
"""

from __future__ import annotations

import ipaddress
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storyfarm.story.config import deep_merge, expand_vars, format_validation_errors, read_mapping

MiB = 1 << 20
# One 832x480, 81-frame, 40-step shot is 1.29e9 pixel-frame-steps; 1280x720 at 81 frames and 40
# steps is 2.99e9. The default admits both and refuses, e.g., 832x480x321x40 (5.1e9).
DEFAULT_MAX_WORK = 4_000_000_000

Role = Literal["viewer", "submitter", "admin"]
ALL_PROJECTS = "*"


class ConfigError(ValueError):
    """The configuration is invalid or unsafe; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(value: Path | None) -> Path | None:
    return None if value is None else Path(os.path.abspath(os.path.expanduser(str(value))))


def parse_address(address: str) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port` -> (host, port); None for a unix socket (`unix:...`).
    Raises ValueError with what is allowed."""
    if address.startswith(("unix:", "unix-abstract:")):
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", address)
    if not m:
        raise ValueError(f"{address!r}: expected HOST:PORT, [IPV6]:PORT or unix:PATH")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if int(port) > 65535:
        raise ValueError(f"{address!r}: port must be 0..65535")
    return host, int(port)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped), `localhost` and unix sockets."""
    parsed = parse_address(address)
    if parsed is None:
        return True
    host = parsed[0]
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not known to be loopback
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class TokenEntry(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    project: str = Field(min_length=1, max_length=64, pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]*)$")
    role: Role
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f]{64}", v):
            raise ValueError("must be the token's sha256 as 64 hex characters (never the token itself); "
                             "`storyfarm token create` makes a token and this entry")
        return v.lower()

    @model_validator(mode="after")
    def _admin_spans_projects(self):
        if self.role == "admin" and self.project != ALL_PROJECTS:
            raise ValueError(f"token {self.name!r}: admin tokens act on every project; set project: '*'")
        return self


class AuthConfig(_Strict):
    require: bool = False  # False: every caller is an anonymous admin (loopback development only)
    tokens: tuple[TokenEntry, ...] = ()

    @model_validator(mode="after")
    def _consistent(self):
        if self.require and not self.tokens:
            raise ValueError("require is true but tokens is empty: no caller could be admitted")
        for key in ("name", "sha256"):
            seen: set[str] = set()
            for t in self.tokens:
                value = getattr(t, key)
                if value in seen:
                    shown = t.name if key == "name" else f"of token {t.name!r}"
                    raise ValueError(f"tokens: duplicate {key} {shown}; each token must be unique")
                seen.add(value)
        return self


class TLSConfig(_Strict):
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mTLS, every client must present a certificate it signed

    @field_validator("cert", "key", "client_ca")
    @classmethod
    def _paths(cls, v: Path | None) -> Path | None:
        return _absolute(v)


class LimitsConfig(_Strict):
    max_message_bytes: int = Field(64 * MiB, ge=1024)
    max_concurrent_rpcs: int = Field(128, ge=1)
    max_story_bytes: int = Field(1 * MiB, ge=1)
    max_shots: int = Field(1000, ge=1)
    max_references: int = Field(64, ge=0)
    max_reference_bytes: int = Field(16 * MiB, ge=1)
    max_reference_pixels: int = Field(40_000_000, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)
    max_work: int = Field(DEFAULT_MAX_WORK, ge=1)  # width * height * frames * steps, per shot

    @model_validator(mode="after")
    def _fit_in_a_message(self):
        for key in ("max_story_bytes", "max_reference_bytes"):
            if getattr(self, key) > self.max_message_bytes:
                raise ValueError(f"{key} ({getattr(self, key)}) exceeds max_message_bytes ({self.max_message_bytes}); "
                                 "it arrives inside one message")
        return self

    def admits_work(self, width: int, height: int, frames: int, steps: int) -> bool:
        return width * height * frames * steps <= self.max_work


class ProjectQuotaConfig(_Strict):
    guaranteed: int = Field(0, ge=0)  # workers the project gets first when it has work
    burst: int | None = Field(None, ge=1)  # most workers at once; null: no cap
    max_concurrent_stories: int | None = Field(None, ge=1)  # stories in progress at once; null: no cap


class CostConfig(_Strict):
    """The scheduler's first guess of shot cost (it learns base_s from finished shots)."""

    base_s: float = Field(60.0, gt=0)
    growth_per_memory_frame: float = Field(0.06, ge=0)
    swap_s: float = Field(4.0, ge=0)


class RayConfig(_Strict):
    address: str | None = None  # null: start a local Ray instance; "auto": this node's cluster; "ray://head:10001"
    num_cpus: int | None = Field(None, ge=1)  # local instance only


class SchedulerConfig(_Strict):
    executor: Literal["mp", "ray"] = "mp"
    worker: Literal["render", "fake"] = "render"  # fake: renders nothing (measures the daemon alone)
    gpus_per_worker: int = Field(1, ge=1)
    expert_placement: Literal["both", "swap"] = "both"
    move_cost_s: float = Field(20.0, ge=0)
    heartbeat_timeout_s: float = Field(300.0, gt=0)
    start_timeout_s: float = Field(900.0, gt=0)
    failure_limit: int = Field(3, ge=1)
    failure_window_s: float = Field(3600.0, gt=0)
    projects: dict[str, ProjectQuotaConfig] = {}
    default_project: ProjectQuotaConfig = ProjectQuotaConfig()
    cost: CostConfig = CostConfig()
    ray: RayConfig = RayConfig()

    @field_validator("projects")
    @classmethod
    def _project_names(cls, v: dict) -> dict:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ValueError(f"project name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return v


class DaemonConfig(_Strict):
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9400"
    data_dir: Path = Field(Path("var"), validate_default=True)  # made absolute against the working directory
    preset: str = Field("tiny", min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1)
    reflection: bool = True
    grace_seconds: float = Field(30.0, ge=0)
    max_attempts: int = Field(3, ge=1)
    auth: AuthConfig = AuthConfig()
    tls: TLSConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    log_format: Literal["text", "json"] = "text"
    scheduler: SchedulerConfig = SchedulerConfig()

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_address(v)
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, v: Path) -> Path:
        return _absolute(v)

    @property
    def mtls(self) -> bool:
        return self.tls is not None and self.tls.client_ca is not None

    def redacted_dict(self) -> dict[str, Any]:
        """The merged configuration as plain JSON-able data, token hashes hidden."""
        out = self.model_dump(mode="json")
        for token in out["auth"]["tokens"]:
            token["sha256"] = "<redacted>"
        return out


def check_exposure(config: DaemonConfig) -> None:
    """Refuse a configuration that would serve strangers without knowing who they are, or that
    names TLS files that are not there."""
    if config.tls is not None:
        for key in ("cert", "key", "client_ca"):
            path = getattr(config.tls, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"tls.{key}: no such file {path}")
    if is_loopback(config.listen):
        return
    if (config.auth.require and config.auth.tokens) or config.mtls:
        return
    raise ConfigError(
        f"listen: {config.listen} is not a loopback address; refusing to serve it without authentication. "
        "Configure auth (require: true and at least one token) or mTLS (tls.cert, tls.key, tls.client_ca), "
        "or listen on 127.0.0.1 / [::1]."
    )


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Flags as a dict: None means 'not given'; dotted keys (`limits.max_shots`) are nested."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = _nest(value)
        *parents, leaf = str(key).split(".")
        nested: dict[str, Any] = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        out = deep_merge(out, nested)
    return out


def packaged_config(name: str) -> Path:
    """Path of a config shipped in storyfarm.configs (`default`, `production`)."""
    res = resources.files("storyfarm.configs") / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(f"config: no such file or packaged config {name!r} (packaged: default, production)")
    return Path(str(res))


def _read_file(path: str) -> tuple[dict[str, Any], str]:
    file = Path(path)
    if not file.exists() and file.suffix not in (".yaml", ".yml") and os.sep not in path:
        file = packaged_config(path)
    if not file.is_file():
        raise ConfigError(f"config: no such file {path}")
    origin = str(file)
    data = read_mapping(file.read_text(), origin, ConfigError)
    return expand_vars(data, "", origin, ConfigError), origin


def _validate(data: dict[str, Any], origin: str) -> DaemonConfig:
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc, origin)) from None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    """Merge flags over the file over the embedded defaults, validate, and check exposure.

    `path`: a YAML file, or the name of a packaged config (`production`); None: defaults only.
    `overrides`: flag values, nested or with dotted keys; None values are ignored.
    Raises ConfigError naming the source, the field path and what is allowed.
    """
    data: dict[str, Any] = {}
    config = DaemonConfig()
    if path is not None:
        data, origin = _read_file(os.fspath(path))
        config = _validate(data, origin)  # errors in the file are reported against the file
    flags = _nest(overrides or {})
    if flags:
        config = _validate(deep_merge(data, flags), "command line")
    check_exposure(config)
    return config
