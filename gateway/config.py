"""The gateway's commissioning config: one TOML file → frozen, validated pydantic models.

Owns the config schema, its cross-checks, the error report, and `dergw check-config FILE`.
Every table rejects unknown keys (a misspelt limit must never be silently ignored), and
`load_config` reports *every* problem at once, one line each, naming the file, the key as a dotted
path with list indices, and the reason:

    site.toml: devices[2].params.port: Input should be less than or equal to 65535

Each device's `params` table is validated by its driver's own model
(`drivers.registry.params_model(driver)`) and kept as that model instance.

Cross-checks (beyond per-field ranges):
* device ids are unique;
* `role = "pcc"` is allowed only on meters, and on at most one of them;
* a pcc meter is **required** when the config sets an export or import limit (`site.*_limit_w` or
  `control.fallback.*_limit_w`) and has a PV or battery device to enforce it with: those limits
  are measured at the point of common coupling, and closed-loop control without that meter would
  be guesswork. Without limits in the config, a site may run without a pcc meter (e.g. a PV plant
  curtailed by `max_gen_pct` only); if an intent later asks for a PCC limit, control has no PCC
  reading and must treat it like a stale meter (open loop on `control.assumed_min_load_w`);
* `control.revert_timeout_s >= 2 × control.period_s`, and
  `control.period_s <= control.refresh_s < control.revert_timeout_s` (the device-side revert timer
  must be refreshed before it fires).

Cross-checks run once every field is valid (pydantic runs model validators after the fields), so
a file with field errors may show more problems after those are fixed.

Relative paths (`gateway.state_dir`) resolve against the directory of the config file, so a
config means the same thing whatever the working directory of the process.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import re
import sys
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SerializeAsAny,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

from drivers import registry
from drivers.contract import DeviceKind

__all__ = [
    "ConfigError",
    "ControlConfig",
    "DeviceConfig",
    "FallbackConfig",
    "GatewayConfig",
    "GatewaySection",
    "GrpcUplinkConfig",
    "LocalApiConfig",
    "MqttUplinkConfig",
    "OutboxConfig",
    "SecurityConfig",
    "SiteConfig",
    "UplinkConfig",
    "check_config_main",
    "load_config",
]

# Largest number of records per TelemetryBatch on the wire (dergw.v1.MAX_RECORDS_PER_BATCH; kept
# as a literal so that validating a config does not load protobuf; a test keeps them equal).
MAX_BATCH_RECORDS = 2000

Slug = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$"),
    Field(description="lower-case letters, digits, '.', '_', '-'; starts with a letter/digit"),
]
NonNegativeWatts = Annotated[float, Field(ge=0)]
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]


class ConfigError(Exception):
    """The config file could not be read or is invalid; one line per problem in `problems`."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _fail(*problems: tuple[tuple[str | int, ...], str, Any]) -> ValidationError:
    """A ValidationError with one line per (loc, message, input); locs are relative to the model."""
    return ValidationError.from_exception_data(
        "config",
        [
            InitErrorDetails(type=PydanticCustomError("config", message), loc=loc, input=value)
            for loc, message, value in problems
        ],
    )


class GatewaySection(_Model):
    id: Slug
    state_dir: Path
    log_level: LogLevel = "INFO"

    @field_validator("state_dir")
    @classmethod
    def _resolve_state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        base = info.context.get("config_dir") if isinstance(info.context, Mapping) else None
        if base is not None and not value.is_absolute():
            return Path(base) / value
        return value


class SiteConfig(_Model):
    id: Slug
    name: Annotated[str, StringConstraints(min_length=1)]
    substation: str = ""
    feeder: str = ""
    export_limit_w: NonNegativeWatts | None = None  # contracted export limit at the PCC
    import_limit_w: NonNegativeWatts | None = None  # contracted import limit at the PCC
    # Where the site is (decimal degrees), for the solar shape of the PV forecast; optional.
    latitude: Annotated[float, Field(ge=-90, le=90)] | None = None
    longitude: Annotated[float, Field(ge=-180, le=180)] | None = None


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _split_target(target: str) -> tuple[str, int]:
    """ "host:port" → (host, port); IPv6 hosts in brackets ("[::1]:50051"). ValueError says why."""
    example = 'expected "host:port", e.g. "headend.example.net:443" or "[::1]:50051"'
    if target.startswith("["):
        host, sep, port_text = target[1:].partition("]:")
        if not sep:
            raise ValueError(f"{target!r}: {example}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{target!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{target!r}: {example}")
        if ":" in host:
            raise ValueError(f"{target!r}: put an IPv6 address in brackets, e.g. [{host}]:port")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{target!r}: {host!r} is not a valid host name or IPv4 address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{target!r}: port must be a number in 1..65535")
    return host, int(port_text)


def _check_https_url(cls: type[BaseModel], value: str | None) -> str | None:
    """`enroll_url`: "https://host:port" (renewal presents a certificate and expects TLS)."""
    if value is None:
        return None
    if not value.startswith("https://") or not value[len("https://") :].strip("/"):
        raise ValueError(f"{value!r}: expected the headend's HTTPS URL, e.g. https://headend:8443")
    return value.rstrip("/")


class GrpcUplinkConfig(_Model):
    """`transport = "grpc"`: one bidi stream to the headend at `target`."""

    transport: Literal["grpc"]
    target: str  # "host:port" of the headend
    keepalive_s: Annotated[float, Field(ge=1, le=3600)] = 20.0
    reconnect_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0  # reconnect backoff ceiling
    batch_max_records: Annotated[int, Field(ge=1, le=MAX_BATCH_RECORDS)] = 500
    inflight_batches: Annotated[int, Field(ge=1, le=64)] = 4  # sent ahead of the headend's ack
    # Backlog resend pace after an outage, records/s (0 = as fast as acks allow); the headend's
    # RegisterAck can set it instead. The live lane is never paced.
    backlog_records_per_s: Annotated[int, Field(ge=0)] = 0
    # A session with batches in flight and no Ack for this long is ended and reconnected (a
    # headend that died mid-batch behind an MQTT broker, or hung): unacked rows are resent.
    ack_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 20.0
    # mTLS with the identity `dergw enroll` stored in state_dir (gateway.identity). false =
    # plaintext, for local development against a headend run without --tls-dir only.
    tls: bool = True
    # The headend's HTTPS base URL ("https://host:port") for certificate renewal with a new key at
    # 2/3 of the certificate's lifetime; without it the certificate is not renewed (re-enroll).
    enroll_url: str | None = None
    # Reconnect delay after the headend (or broker) rejected our certificate (expired, unknown
    # CA, revoked) or while not enrolled: retrying sooner cannot help.
    rejected_backoff_s: Annotated[float, Field(gt=0, le=86400)] = 600.0

    _check_enroll_url = field_validator("enroll_url")(_check_https_url)

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        _split_target(value)
        return value

    @property
    def host(self) -> str:
        return _split_target(self.target)[0]

    @property
    def port(self) -> int:
        return _split_target(self.target)[1]


# Topic levels may not contain wildcards ('+', '#') or be empty; the prefix is ASCII for ACLs.
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")


class MqttUplinkConfig(_Model):
    """`transport = "mqtt"`: MQTT v5 through the broker at `broker` (topics in
    `gateway.runtime.mqtt_transport`). The broker keeps a persistent session per client id for
    `session_expiry_s`, so intents published while the gateway is offline wait there."""

    transport: Literal["mqtt"]
    broker: str  # "host:port" of the MQTT broker
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    username: str | None = None
    password: str | None = None
    session_expiry_s: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 7 * 24 * 3600
    keepalive_s: Annotated[int, Field(ge=5, le=65535)] = 20
    topic_prefix: Annotated[str, StringConstraints(pattern=_TOPIC_PREFIX.pattern)] = "dergw/v1"
    reconnect_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0  # reconnect backoff ceiling
    batch_max_records: Annotated[int, Field(ge=1, le=MAX_BATCH_RECORDS)] = 500
    inflight_batches: Annotated[int, Field(ge=1, le=64)] = 4  # sent ahead of the headend's ack
    # Backlog resend pace after an outage, records/s (0 = as fast as acks allow); the headend's
    # RegisterAck can set it instead. The live lane is never paced.
    backlog_records_per_s: Annotated[int, Field(ge=0)] = 0
    # A session with batches in flight and no Ack for this long is ended and reconnected (a
    # headend that died mid-batch behind an MQTT broker, or hung): unacked rows are resent.
    ack_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 20.0
    # mTLS with the identity `dergw enroll` stored in state_dir (gateway.identity). false =
    # plaintext, for local development against a headend run without --tls-dir only.
    tls: bool = True
    # The headend's HTTPS base URL ("https://host:port") for certificate renewal with a new key at
    # 2/3 of the certificate's lifetime; without it the certificate is not renewed (re-enroll).
    enroll_url: str | None = None
    # Reconnect delay after the headend (or broker) rejected our certificate (expired, unknown
    # CA, revoked) or while not enrolled: retrying sooner cannot help.
    rejected_backoff_s: Annotated[float, Field(gt=0, le=86400)] = 600.0

    _check_enroll_url = field_validator("enroll_url")(_check_https_url)

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        _split_target(value)
        return value

    @model_validator(mode="after")
    def _password_needs_username(self) -> Self:
        if self.password is not None and self.username is None:
            raise _fail((("password",), "a password needs a username", "***"))
        return self

    @property
    def target(self) -> str:
        """The broker, "host:port" (health, logs and `dergw check-config`)."""
        return self.broker

    @property
    def host(self) -> str:
        return _split_target(self.broker)[0]

    @property
    def port(self) -> int:
        return _split_target(self.broker)[1]


_BUILTIN_ERRORS = frozenset(get_args(ErrorType))
_UPLINK_MODELS: dict[str, type[GrpcUplinkConfig] | type[MqttUplinkConfig]] = {
    "grpc": GrpcUplinkConfig,
    "mqtt": MqttUplinkConfig,
}


def _uplink_by_transport(value: Any) -> GrpcUplinkConfig | MqttUplinkConfig:
    """Validate `[uplink]` with the model its `transport` names (a discriminated union whose
    error locations stay `uplink.KEY`, without pydantic's tag level, and whose unknown-key hints
    list the keys of the chosen transport)."""
    if isinstance(value, GrpcUplinkConfig | MqttUplinkConfig):
        return value
    if not isinstance(value, Mapping):
        raise PydanticCustomError("config", "expected a table ([uplink])")
    transport = value.get("transport")
    if transport is None:
        raise _fail((("transport",), "required key is missing", None))
    model = _UPLINK_MODELS.get(transport) if isinstance(transport, str) else None
    if model is None:
        known = " or ".join(repr(name) for name in _UPLINK_MODELS)
        raise _fail((("transport",), f"Input should be {known}", transport))
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors: list[InitErrorDetails] = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            if error["type"] == "extra_forbidden" and len(loc) == 1:
                allowed = list(model.model_fields)
                close = difflib.get_close_matches(str(loc[0]), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                message = f"unknown key; {hint}allowed here (transport = {transport!r}): "
                message += ", ".join(allowed)
                errors.append(
                    InitErrorDetails(
                        type=PydanticCustomError("config", message), loc=loc, input=error["input"]
                    )
                )
            elif error["type"] in _BUILTIN_ERRORS:
                details = InitErrorDetails(type=error["type"], loc=loc, input=error["input"])
                if "ctx" in error:
                    details["ctx"] = error["ctx"]
                errors.append(details)
            else:  # raised by a validator of the model (_fail): keep its message
                custom = PydanticCustomError(error["type"], error["msg"])
                errors.append(InitErrorDetails(type=custom, loc=loc, input=error["input"]))
        raise ValidationError.from_exception_data("config", errors) from None


# `[uplink]`: `transport = "grpc"` (GrpcUplinkConfig) or `"mqtt"` (MqttUplinkConfig). Both
# expose `.transport`, `.target` ("host:port" of the headend or broker) and the shared fields.
UplinkConfig = Annotated[GrpcUplinkConfig | MqttUplinkConfig, PlainValidator(_uplink_by_transport)]


class FallbackConfig(_Model):
    """Static commissioning fallback, in force while no default control was ever received."""

    export_limit_w: NonNegativeWatts | None = None
    import_limit_w: NonNegativeWatts | None = None
    max_gen_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    connect: bool | None = None


class InterlockConfig(_Model):
    """A static local interlock: a limit the site keeps whatever any intent or override asks.

    E.g. a hard zero-export contract enforced locally, or a device that must stay disconnected.
    Interlocks rank above utility limits in the safety kernel and still apply if the gateway
    dies (they are programmed as the devices' reversion values where the model allows).
    """

    name: Annotated[str, StringConstraints(min_length=1)]
    device: Slug | None = None  # None = the whole site
    export_limit_w: NonNegativeWatts | None = None
    import_limit_w: NonNegativeWatts | None = None
    gen_limit_w: NonNegativeWatts | None = None
    load_limit_w: NonNegativeWatts | None = None
    max_gen_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    connect: Literal[False] | None = None  # an interlock can only keep a device disconnected

    @model_validator(mode="after")
    def _sets_something(self) -> Self:
        fields = ("export_limit_w", "import_limit_w", "gen_limit_w", "load_limit_w")
        if all(getattr(self, f) is None for f in (*fields, "max_gen_pct", "connect")):
            raise _fail(((), "an interlock must set at least one limit (or connect = false)", None))
        return self


class ControlConfig(_Model):
    period_s: Annotated[float, Field(ge=0.05, le=60)] = 1.0  # control loop period
    revert_timeout_s: Annotated[int, Field(ge=1)] = 60  # device-side revert timer, armed per write
    refresh_s: Annotated[float, Field(gt=0)] = 10.0  # re-write unchanged setpoints this often
    meter_stale_periods: Annotated[int, Field(ge=1)] = 3  # older readings are not used
    # A device write that has not completed by then counts as failed, so a hung driver never
    # holds up the control loop or the other devices' writes (drivers time out on their own).
    write_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    export_margin_w: NonNegativeWatts = 50.0  # stay this far inside export limits
    assumed_min_load_w: NonNegativeWatts = 0.0  # site load assumed without a fresh PCC reading
    # Share of a loosening export budget taken per cycle (tightening is always immediate):
    # below 1 the loop cannot overshoot the limit on readings up to a poll period old.
    export_relax_gain: float = Field(default=0.5, gt=0.0, le=1.0)
    # When the wall clock counts as right (scheduled events wait for it): "assume" (dev, RTC),
    # "kernel" (adjtimex reports NTP sync) or "file:PATH" (e.g. timesyncd's synchronized flag).
    clock_trust: Annotated[str, StringConstraints(pattern=r"^(assume|kernel|file:.+)$")] = "assume"
    # Optional: after this long without the headend, stop executing events (defaults only).
    # Off by default (CSIP-AUS: keep following the cached schedule).
    max_offline_s: Annotated[float, Field(gt=0)] | None = None
    # Closed-loop PCC control (export/import limits).
    export_deadband_w: NonNegativeWatts = 25.0  # no change while this close inside the margin
    export_relax_max_step_pct: Annotated[float, Field(gt=0, le=100)] = 20.0  # per cycle
    pcc_average_s: Annotated[float, Field(ge=0, le=60)] = 2.0  # time-weighted PCC average
    export_probe_pct: Annotated[float, Field(ge=0, le=10)] = 1.0  # hidden-PV probe, % rating
    # Grid: inverters' frequency response holds the loop outside nominal ± deadband.
    nominal_hz: Literal[50, 60] | None = None  # None = the nearer of 50 / 60 Hz
    frequency_deadband_hz: Annotated[float, Field(gt=0, le=1)] = 0.036
    # Software ramp of caps and battery setpoints, % of rating per second (None = no ramp).
    # Reductions needed to meet a limit, protection and interlocks always apply at once.
    ramp_pct_per_s: Annotated[float, Field(gt=0, le=1000)] | None = None
    ramp_down_immediate: bool = True
    # Battery SoC window with hysteresis (the intent's site constraints may tighten it).
    soc_min_pct: Annotated[float, Field(ge=0, le=100)] = 10.0
    soc_max_pct: Annotated[float, Field(ge=0, le=100)] = 100.0
    soc_hysteresis_pct: Annotated[float, Field(ge=0, le=50)] = 5.0
    interlocks: tuple[InterlockConfig, ...] = ()
    fallback: FallbackConfig = FallbackConfig()

    @model_validator(mode="after")
    def _check_timers(self) -> Self:
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        if self.revert_timeout_s < 2 * self.period_s:
            problems.append(
                (
                    ("revert_timeout_s",),
                    f"must be at least 2 × period_s = {2 * self.period_s:g} s, so that one late "
                    "control period does not let the devices revert",
                    self.revert_timeout_s,
                )
            )
        if self.refresh_s >= self.revert_timeout_s:
            problems.append(
                (
                    ("refresh_s",),
                    f"must be less than revert_timeout_s = {self.revert_timeout_s} s, or the "
                    "devices revert between refreshes",
                    self.refresh_s,
                )
            )
        elif self.refresh_s < self.period_s:
            problems.append(
                (
                    ("refresh_s",),
                    f"must be at least period_s = {self.period_s:g} s: setpoints are written at "
                    "most once per control period",
                    self.refresh_s,
                )
            )
        if self.soc_min_pct >= self.soc_max_pct:
            problems.append(
                (
                    ("soc_min_pct",),
                    f"must be below soc_max_pct = {self.soc_max_pct:g} %",
                    self.soc_min_pct,
                )
            )
        if problems:
            raise _fail(*problems)
        return self


class OutboxConfig(_Model):
    commit_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.1
    # Disk budget of the outbox backlog; when reached, the outbox sheds by its documented policy
    # (gateway.outbox: thin the oldest raw samples to aggregates first) and reports a Gap.
    quota_bytes: Annotated[int, Field(gt=0)] | None = None

    @field_validator("quota_bytes")
    @classmethod
    def _quota_floor(cls, value: int | None) -> int | None:
        # gateway.outbox.MIN_QUOTA_BYTES (not imported: the config stays free of runtime modules).
        if value is not None and value < 65_536:
            raise PydanticCustomError(
                "config",
                f"{value} bytes is too small: the outbox needs at least 65536 bytes (64 KiB) to "
                "keep its Gap records; a real backlog budget is e.g. 1_000_000_000",
            )
        return value


class _Unchecked(BaseModel):
    """Stands in for `params` when the driver itself is invalid; that already fails validation,
    so this value never reaches a constructed config."""


_UNCHECKED = _Unchecked()


class DeviceConfig(_Model):
    id: Slug
    kind: DeviceKind
    driver: str
    role: Literal["pcc"] | None = None
    poll_period_s: Annotated[float, Field(ge=0.01, le=3600)] = 1.0
    # Validated by the driver's own model (extra="forbid"); kept as that model's instance.
    params: SerializeAsAny[BaseModel] = Field(default_factory=dict, validate_default=True)

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if value not in registry.DRIVERS:
            raise PydanticCustomError(
                "unknown_driver",
                f"unknown driver {value!r}; known drivers: {', '.join(sorted(registry.DRIVERS))}",
            )
        return value

    @field_validator("params", mode="plain")
    @classmethod
    def _driver_params(cls, value: Any, info: ValidationInfo) -> BaseModel:
        driver = info.data.get("driver")
        if driver is None:
            return _UNCHECKED
        try:
            model = registry.params_model(driver)
        except (ImportError, AttributeError) as exc:
            spec = registry.DRIVERS[driver]
            raise PydanticCustomError(
                "driver_unavailable",
                f"cannot check: driver {driver!r} is not available in this installation "
                f"({spec.module}.{spec.params}: {exc}); reinstall dergw",
            ) from None
        # A ValidationError raised here keeps its locations under devices[i].params.
        return model.model_validate(value)

    @model_validator(mode="after")
    def _pcc_is_a_meter(self) -> Self:
        if self.role == "pcc" and self.kind is not DeviceKind.METER:
            raise _fail(
                (
                    ("role",),
                    f"only a meter can be the pcc (point of common coupling); this device is "
                    f"kind {self.kind.value!r}",
                    self.role,
                )
            )
        return self


class SecurityConfig(_Model):
    """`[security]`: what this gateway trusts.

    `intent_keys_file`: the headend's public intent-signing keys (trust file, JSON; see
    gateway.intent_verify), installed at enrollment; default `<state_dir>/intent-keys.json`;
    a relative path resolves against the config file's directory. Read at start and re-read
    when it changes. Without it (not enrolled yet) the gateway still runs its local control and
    refuses every intent as UNKNOWN_KEY.
    """

    intent_keys_file: Path | None = None

    @field_validator("intent_keys_file")
    @classmethod
    def _resolve_keys_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base = info.context.get("config_dir") if isinstance(info.context, Mapping) else None
        if value is not None and base is not None and not value.is_absolute():
            return Path(base) / value
        return value

    def intent_keys_path(self, state_dir: Path) -> Path:
        return self.intent_keys_file or state_dir / "intent-keys.json"


class LocalApiConfig(_Model):
    """`[local_api]`: the gateway's local API on a Unix socket (gateway.localapi).

    `socket`: its path (default `<state_dir>/dergw.sock`; packaged installs use
    /run/dergw/dergw.sock); a relative path resolves against the config file's directory.
    `group`: the group the socket is given (mode 0660: that group's members may use it).
    The peer's user (SO_PEERCRED) is the origin recorded for overrides: "local:<user>".
    """

    enabled: bool = True
    socket: Path | None = None
    group: str | None = Field(default=None, min_length=1)

    @field_validator("socket")
    @classmethod
    def _resolve_socket(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base = info.context.get("config_dir") if isinstance(info.context, Mapping) else None
        if value is not None and base is not None and not value.is_absolute():
            return Path(base) / value
        return value

    def socket_path(self, state_dir: Path) -> Path:
        return self.socket or state_dir / "dergw.sock"


class GatewayConfig(_Model):
    gateway: GatewaySection
    site: SiteConfig
    uplink: UplinkConfig
    control: ControlConfig = ControlConfig()
    outbox: OutboxConfig = OutboxConfig()
    security: SecurityConfig = SecurityConfig()
    local_api: LocalApiConfig = LocalApiConfig()
    devices: tuple[DeviceConfig, ...] = ()

    @model_validator(mode="after")
    def _check_devices(self) -> Self:
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        first_index: dict[str, int] = {}
        for i, device in enumerate(self.devices):
            if device.id in first_index:
                problems.append(
                    (
                        ("devices", i, "id"),
                        f"duplicate device id {device.id!r} "
                        f"(also devices[{first_index[device.id]}])",
                        device.id,
                    )
                )
            else:
                first_index[device.id] = i
        pccs = [i for i, device in enumerate(self.devices) if device.role == "pcc"]
        problems += [
            (
                ("devices", i, "role"),
                f"only one meter may be the pcc; devices[{pccs[0]}] already is",
                "pcc",
            )
            for i in pccs[1:]
        ]
        if not pccs:
            limits = [
                name
                for name, value in (
                    ("site.export_limit_w", self.site.export_limit_w),
                    ("site.import_limit_w", self.site.import_limit_w),
                    ("control.fallback.export_limit_w", self.control.fallback.export_limit_w),
                    ("control.fallback.import_limit_w", self.control.fallback.import_limit_w),
                )
                if value is not None
            ]
            controllable = any(d.kind is not DeviceKind.METER for d in self.devices)
            if limits and controllable:
                problems.append(
                    (
                        ("devices",),
                        f'a meter with role = "pcc" is required: {", ".join(limits)} '
                        "is enforced at the point of common coupling, which needs its meter",
                        None,
                    )
                )
        known = {device.id for device in self.devices}
        problems += [
            (
                ("control", "interlocks", i, "device"),
                f"unknown device {interlock.device!r}; devices: {', '.join(sorted(known))}",
                interlock.device,
            )
            for i, interlock in enumerate(self.control.interlocks)
            if interlock.device is not None and interlock.device not in known
        ]
        if problems:
            raise _fail(*problems)
        return self

    @property
    def pcc_meter(self) -> DeviceConfig | None:
        return next((d for d in self.devices if d.role == "pcc"), None)


# -- loading and error report ---------------------------------------------------------------------


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: Sequence[str | int], raw: Any) -> type[BaseModel] | None:
    """The model that validates the table at `loc` (None if unknown), for 'unknown key' hints."""
    model: type[BaseModel] | None = GatewayConfig
    node = raw
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if model is None:
            return None
        if model is DeviceConfig and part == "params":
            driver = node.get("driver") if isinstance(node, dict) else None
            try:
                model = registry.params_model(driver) if isinstance(driver, str) else None
            except (KeyError, ImportError, AttributeError):
                model = None
        else:
            field = model.model_fields.get(part)
            model = None if field is None else _model_in(field.annotation)
        node = node.get(part) if isinstance(node, dict) else None
    return model


def _reason(error: Mapping[str, Any], raw: Any) -> str:
    kind, message = error["type"], str(error["msg"])
    loc = tuple(error["loc"])
    if kind == "extra_forbidden" and loc:
        model = _model_at(loc[:-1], raw)
        if model is None:
            return "unknown key"
        allowed = list(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key; {hint}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    return message.removeprefix("Value error, ")


def _toml_problem(name: str, exc: tomllib.TOMLDecodeError) -> str:
    text = str(exc)
    match = re.search(r"\(at line (\d+), column (\d+)\)$", text)
    if match:
        reason = text[: match.start()].strip()
        return f"{name}:{match[1]}:{match[2]}: TOML syntax error: {reason}"
    return f"{name}: TOML syntax error: {text}"


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the config at `path`; raise ConfigError listing every problem."""
    path = Path(path)
    name = str(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{name}: config file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{name}: is a directory, expected a TOML config file"]) from None
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(name, exc)]) from None
    try:
        return GatewayConfig.model_validate(raw, context={"config_dir": path.parent.absolute()})
    except ValidationError as exc:
        raise ConfigError(
            [
                f"{name}: {_dotted(error['loc'])}: {_reason(error, raw)}"
                for error in exc.errors(include_url=False)
            ]
        ) from None


def _summary(path: str, config: GatewayConfig) -> str:
    site = config.site
    where = ", ".join(
        part
        for part in (
            f"substation {site.substation}" if site.substation else "",
            f"feeder {site.feeder}" if site.feeder else "",
        )
        if part
    )
    limits = ", ".join(
        f"{what} limit {value:g} W"
        for what, value in (("export", site.export_limit_w), ("import", site.import_limit_w))
        if value is not None
    )
    kinds = Counter(device.kind for device in config.devices)
    by_kind = ", ".join(f"{kinds[kind]} {kind.value}" for kind in DeviceKind if kinds[kind])
    pcc = config.pcc_meter
    lines = [
        f"{path}: OK",
        f"  gateway  {config.gateway.id} (state_dir {config.gateway.state_dir})",
        f"  site     {site.id} {site.name!r}"
        + (f" ({where})" if where else "")
        + (f"; {limits}" if limits else ""),
        f"  devices  {len(config.devices)}"
        + (f": {by_kind}" if by_kind else "")
        + (f"; pcc meter {pcc.id}" if pcc else ""),
        f"  uplink   {config.uplink.transport} {config.uplink.target}"
        + (" (mTLS)" if config.uplink.tls else " (plaintext: local development only)"),
    ]
    return "\n".join(lines)


def check_config_main(argv: list[str]) -> int:
    """`dergw check-config FILE`: 0 valid (prints a summary), 1 invalid (stderr), 2 usage."""
    parser = argparse.ArgumentParser(
        prog="dergw check-config",
        description="Validate a dergw gateway config file and print a summary.",
    )
    parser.add_argument("file", help="the gateway config (TOML)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors (2) and on --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.file}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    print(_summary(args.file, config))
    return 0
