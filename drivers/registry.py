"""Which drivers exist, their parameter models, and how to build one: the uniform driver registry.

A device in the gateway config names a driver (`driver = "sunspec-modbus"`) and gives its
parameters in a `params` table; the driver's own pydantic model validates them (unknown keys are
rejected). Driver modules are imported lazily: a site without Modbus devices never loads pymodbus.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel

from drivers.contract import DeviceKind, Driver
from gateway.clock import Clock

__all__ = ["DRIVERS", "DriverSpec", "UnknownDriverError", "create_driver", "params_model"]


class UnknownDriverError(KeyError):
    def __str__(self) -> str:
        return f"unknown driver {self.args[0]!r}; known drivers: {', '.join(sorted(DRIVERS))}"


@dataclass(frozen=True, slots=True)
class DriverSpec:
    module: str  # module that holds the driver
    params: str  # name of its pydantic parameter model (extra="forbid")
    factory: str  # name of the class: factory(device_id, kind, params, clock) -> Driver
    protocol: str  # human name shown in inventories


DRIVERS: dict[str, DriverSpec] = {
    "sunspec-modbus": DriverSpec(
        module="drivers.sunspec.driver",
        params="SunSpecModbusParams",
        factory="SunSpecModbusDriver",
        protocol="sunspec-modbus-tcp",
    ),
    "modbus-profile": DriverSpec(
        module="drivers.modbus_profile.driver",
        params="ModbusProfileParams",
        factory="ModbusProfileDriver",
        protocol="modbus-profile",
    ),
    "opcua": DriverSpec(
        module="drivers.opcua.driver",
        params="OpcUaParams",
        factory="OpcUaDriver",
        protocol="opcua",
    ),
    "dnp3": DriverSpec(
        module="drivers.dnp3.driver",
        params="Dnp3Params",
        factory="Dnp3Driver",
        protocol="dnp3-tcp",
    ),
}


def _spec(name: str) -> DriverSpec:
    try:
        return DRIVERS[name]
    except KeyError:
        raise UnknownDriverError(name) from None


def params_model(name: str) -> type[BaseModel]:
    """The pydantic model that validates the `params` table of a device using driver `name`."""
    spec = _spec(name)
    return cast(type[BaseModel], getattr(importlib.import_module(spec.module), spec.params))


def create_driver(
    name: str, device_id: str, kind: DeviceKind, params: BaseModel, clock: Clock
) -> Driver:
    """Build (but do not connect) the driver `name` for one device."""
    spec = _spec(name)
    factory: Any = getattr(importlib.import_module(spec.module), spec.factory)
    return cast(Driver, factory(device_id, kind, params, clock))
