"""The `params` table of a `driver = "opcua"` device."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OpcUaParams"]


class OpcUaParams(BaseModel):
    """Endpoint, device root, security and subscription settings of one OPC UA device.

    `root` is either a NodeId string (`ns=2;s=Battery1`, `i=85`) or a slash-separated browse path
    under the Objects folder (`Battery1`, `Plant/Battery1`); elements without a `n:` namespace
    index prefix are looked up in `namespace_uri`. Security defaults to Basic256Sha256
    SignAndEncrypt with `client_cert` / `client_key`; `security = "none"` must be explicit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^opc\.tcp://")
    root: str = Field(min_length=1)
    namespace_uri: str = "urn:dergw:sim"
    security: Literal["basic256sha256-sign-encrypt", "none"] = "basic256sha256-sign-encrypt"
    client_cert: Path | None = None  # DER or PEM application instance certificate
    client_key: Path | None = None  # PEM private key
    server_cert: Path | None = None  # pin the server certificate (else taken from the endpoint)
    application_uri: str = "urn:dergw:gateway"  # must be in client_cert's subjectAltName
    timeout_s: float = Field(default=2.0, gt=0.0, le=60.0)
    sampling_interval_ms: float = Field(default=100.0, ge=0.0, le=60_000.0)
    publishing_interval_ms: float = Field(default=200.0, gt=0.0, le=60_000.0)
    deadband: float = Field(default=0.0, ge=0.0)  # absolute deadband on every Double point
    deadbands: dict[str, float] = Field(default_factory=dict)  # per point, overrides `deadband`
    stale_after_s: float = Field(default=3.0, gt=0.0, le=600.0)  # no publish (keep-alive) -> BAD
    reconnect_min_s: float = Field(default=0.5, gt=0.0, le=60.0)
    reconnect_max_s: float = Field(default=30.0, gt=0.0, le=3600.0)

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        if self.security != "none" and (self.client_cert is None or self.client_key is None):
            raise ValueError(
                "security basic256sha256-sign-encrypt needs client_cert and client_key "
                '(set security = "none" explicitly to connect without security)'
            )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        for name, value in self.deadbands.items():
            if value < 0:
                raise ValueError(f"deadbands.{name} must be >= 0")
        return self
