"""SunSpec over Modbus TCP: discovery, model codec from pysunspec2 JSON, verified writes.

Modules (pure ones first; only `driver` does I/O):
  * `models`  - register layouts compiled from pysunspec2's shipped model JSON (never hand-typed);
  * `codec`   - numpy-vectorised decode of whole register blocks (sentinels -> NOT_IMPLEMENTED,
                scale factors read with the block) and range-checked encoding for writes;
  * `profile` - the canonical point set (`W`, `SoC`, `WMaxLimPct`, ...) as a declarative table of
                preferred sources per device kind, plus nameplate sources and kind requirements;
  * `status`  - device protection state from canonical points: `device_fault(reading)` (St = FAULT,
                Evt1 trip bits, battery State = FAULT), named from the model JSON's symbols;
  * `driver`  - `SunSpecModbusDriver` / `SunSpecModbusParams`: the `drivers.contract.Driver` over
                pymodbus' async TCP client (registered as "sunspec-modbus" in drivers.registry).

Importing the package loads nothing heavy; `drivers.registry` imports `driver` (and with it
pymodbus) only for sites that configure a SunSpec device.
"""
