"""Wire messages in, plain data out (pure; no I/O).

`registration_from_pb` validates a Register and turns it into inventory; `plan_telemetry` checks a
TelemetryBatch against the contract (gateway id, consecutive seqs, parallel arrays) and splits it
into the rows each table receives, so the store only runs one executemany per table. Anything
that breaks the contract raises `ProtocolViolation`, whose message is sent back to the gateway.
`flexibility_record` decodes a stored Flexibility report for the API.

The latest values are kept as one row per (gateway, device) with the points packed (a compact
JSON array of `[point, value, unit, quality, time_ns, seq]`, one per point): a batch updates a
device's row once, not one row per point. `merge_latest_points` folds a group's point rows into
the stored packs - per point, the larger seq wins, so a partial read (a DNP3 event poll) keeps
the device's other points and a replayed older batch rolls nothing back - `pack_latest_reads`
packs the devices a group read once, for a store that replaces packs conditionally, and
`unpack_latest_points` turns packs back into `LatestPoint`s.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import groupby, repeat
from operator import itemgetter

from google.protobuf.descriptor import EnumDescriptor

from dergw.v1 import MAX_ID_LENGTH, MAX_RECORDS_PER_BATCH, ns_from_timestamp, pb
from headend_min.model import (
    ClockSyncRow,
    DecisionRow,
    DeviceInfo,
    EventResponseRow,
    FlexibilityRecord,
    FlexibilityRow,
    ForecastPointRecord,
    GapRow,
    IntentStatusRow,
    LatestPoint,
    LatestPointRow,
    Nameplate,
    PointInfo,
    Registration,
    ReportedStateRow,
    SampleRow,
    SampleStatusRow,
    SiteInfo,
    TelemetryRows,
    UnknownRecordRow,
)

__all__ = [
    "MAX_ID_LENGTH",
    "LatestPack",
    "ProtocolViolation",
    "flexibility_record",
    "merge_latest_points",
    "pack_latest_reads",
    "plan_telemetry",
    "registration_from_pb",
    "sample_points",
    "unpack_latest_points",
    "wire_enum_label",
]

_GOOD = pb.QUALITY_GOOD


class ProtocolViolation(ValueError):
    """An up message that breaks the wire contract; the stream ends with INVALID_ARGUMENT."""


def wire_enum_label(enum: EnumDescriptor, number: int, prefix: str) -> str:
    """`RESPONSE_STATUS_STARTED` -> `STARTED`; numbers from a newer contract -> `UNKNOWN_<n>`."""
    value = enum.values_by_number.get(number)
    if value is None:
        return f"UNKNOWN_{number}"
    return value.name.removeprefix(prefix)


def _check_id(value: str, what: str) -> None:
    if not value:
        raise ProtocolViolation(f"{what} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise ProtocolViolation(f"{what} is longer than {MAX_ID_LENGTH} characters")


def _check_limit(value: float, what: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise ProtocolViolation(f"{what} must be a finite number >= 0 W, got {value}")


def registration_from_pb(message: pb.Register) -> Registration:
    _check_id(message.gateway_id, "register.gateway_id")
    if not message.HasField("site"):
        raise ProtocolViolation("register.site is missing; the gateway must name its site")
    site = message.site
    _check_id(site.site_id, "register.site.site_id")
    export_limit_w = site.export_limit_w if site.HasField("export_limit_w") else None
    import_limit_w = site.import_limit_w if site.HasField("import_limit_w") else None
    if export_limit_w is not None:
        _check_limit(export_limit_w, "register.site.export_limit_w")
    if import_limit_w is not None:
        _check_limit(import_limit_w, "register.site.import_limit_w")
    devices: list[DeviceInfo] = []
    seen: set[str] = set()
    for device in message.devices:
        _check_id(device.device_id, "register.devices[].device_id")
        if device.device_id in seen:
            raise ProtocolViolation(f"register lists device {device.device_id!r} twice")
        seen.add(device.device_id)
        plate = device.nameplate
        devices.append(
            DeviceInfo(
                device_id=device.device_id,
                kind=wire_enum_label(pb.DeviceKind.DESCRIPTOR, device.kind, "DEVICE_KIND_"),
                protocol=device.protocol,
                address=device.address,
                manufacturer=device.manufacturer,
                model=device.model,
                serial_number=device.serial_number,
                role=device.role,
                nameplate=Nameplate(
                    max_w=plate.max_w,
                    max_va=plate.max_va,
                    max_var=plate.max_var,
                    max_charge_w=plate.max_charge_w,
                    max_discharge_w=plate.max_discharge_w,
                    energy_wh=plate.energy_wh,
                ),
                points=tuple(PointInfo(p.name, p.unit, p.writable) for p in device.points),
            )
        )
    return Registration(
        gateway_id=message.gateway_id,
        software_version=message.software_version,
        boot_id=message.boot_id,
        site=SiteInfo(
            site_id=site.site_id,
            name=site.name,
            substation=site.substation,
            feeder=site.feeder,
            export_limit_w=export_limit_w,
            import_limit_w=import_limit_w,
        ),
        devices=tuple(devices),
        intent_version=message.intent_version,
        oldest_unacked_seq=message.oldest_unacked_seq,
        next_seq=message.next_seq,
    )


def _check_sample_shape(sample: pb.DeviceSample, seq: int) -> None:
    count = len(sample.names)
    units = len(sample.units)
    quality = len(sample.quality)
    if (
        sample.device_id
        and len(sample.values) == count
        and units in (0, count)
        and quality in (0, count)
    ):
        return  # the common case, without building the error's details
    if not sample.device_id:
        raise ProtocolViolation(f"record seq {seq}: sample.device_id is empty")
    if len(sample.values) != count:
        raise ProtocolViolation(
            f"record seq {seq}: sample has {count} names but {len(sample.values)} values"
        )
    for what, length in (("units", units), ("quality", quality)):
        # Parallel arrays; units and quality may be left empty (unknown unit / unspecified).
        if length not in (0, count):
            raise ProtocolViolation(
                f"record seq {seq}: sample has {count} names but {length} {what}"
            )


def plan_telemetry(batch: pb.TelemetryBatch, gateway_id: str) -> TelemetryRows:
    """Validate one batch and split it into per-table rows.

    Latest values are collapsed here to one row per (device, point) - the newest seq wins - so a
    batch of many reads of the same device costs one upsert per point, not one per read.
    Samples stay packed (one row per read with the serialized DeviceSample).
    """
    if batch.gateway_id != gateway_id:
        raise ProtocolViolation(
            f"telemetry batch names gateway {batch.gateway_id!r} "
            f"but this stream registered {gateway_id!r}"
        )
    records = batch.records
    count = len(records)
    if count > MAX_RECORDS_PER_BATCH:
        raise ProtocolViolation(
            f"telemetry batch has {count} records; at most {MAX_RECORDS_PER_BATCH} are allowed"
        )
    rows = TelemetryRows(gateway_id, batch.first_seq, batch.last_seq)
    if count == 0:
        return rows
    first_seq = batch.first_seq
    if first_seq < 1 or batch.last_seq < first_seq + count - 1:
        raise ProtocolViolation(
            f"telemetry batch says seqs {first_seq}..{batch.last_seq} "
            f"but carries {count} records (seqs start at 1 and are consecutive)"
        )
    samples: list[tuple[int, int, pb.DeviceSample]] = []
    # device_id -> its newest read in the batch (its status row is built once, at the end).
    newest: dict[str, tuple[int, int, pb.DeviceSample]] = {}
    expected = first_seq
    for offset, record in enumerate(records):
        seq = record.seq
        if seq != expected:
            raise ProtocolViolation(
                f"telemetry batch {first_seq}..{batch.last_seq}: record {offset} has seq {seq}, "
                f"expected {expected} (records must be consecutive and in order)"
            )
        kind = record.WhichOneof("body")
        through_seq = record.through_seq or seq
        if through_seq < seq or (through_seq != seq and kind != "gap"):
            raise ProtocolViolation(
                f"record seq {seq}: through_seq {record.through_seq} is only allowed on a gap "
                "record, and never below seq"
            )
        expected = through_seq + 1
        if kind == "sample":
            sample = record.sample
            _check_sample_shape(sample, seq)
            device_id = sample.device_id
            time_ns = ns_from_timestamp(sample.time)
            rows.samples.append(
                SampleRow(
                    gateway_id,
                    seq,
                    device_id,
                    time_ns,
                    sample.SerializeToString(),
                    sample.boot_id,
                    sample.monotonic_ns,
                    # A sample without a boot id comes from a gateway that predates the field:
                    # there is nothing to correct it with, so it counts as synced.
                    int(sample.clock_synced or not sample.boot_id),
                )
            )
            read = (seq, time_ns, sample)
            samples.append(read)
            newest[device_id] = read
        elif kind == "event_response":
            response = record.event_response
            rows.event_responses.append(
                EventResponseRow(
                    gateway_id,
                    seq,
                    response.intent_version,
                    response.event_id,
                    response.status,
                    response.reason,
                    ns_from_timestamp(response.time),
                    (
                        ns_from_timestamp(response.effective_start)
                        if response.HasField("effective_start")
                        else None
                    ),
                    (
                        ns_from_timestamp(response.effective_end)
                        if response.HasField("effective_end")
                        else None
                    ),
                )
            )
        elif kind == "intent_status":
            intent_status = record.intent_status
            rows.intent_statuses.append(
                IntentStatusRow(
                    gateway_id,
                    seq,
                    intent_status.version,
                    intent_status.state,
                    intent_status.reason,
                    ns_from_timestamp(intent_status.time),
                    intent_status.active_event_id,
                )
            )
        elif kind == "reported_state":
            state = record.reported_state
            rows.reported_states.append(
                ReportedStateRow(
                    gateway_id,
                    seq,
                    ns_from_timestamp(state.time),
                    state.intent_version,
                    state.active_event_id,
                    state.source,
                    state.SerializeToString(),
                )
            )
        elif kind == "decision":
            decision = record.decision
            rows.decisions.append(
                DecisionRow(
                    gateway_id,
                    seq,
                    ns_from_timestamp(decision.time),
                    decision.summary,
                    decision.SerializeToString(),
                )
            )
        elif kind == "flexibility":
            flexibility = record.flexibility
            rows.flexibility.append(
                FlexibilityRow(
                    gateway_id,
                    seq,
                    ns_from_timestamp(flexibility.time),
                    _finite(flexibility.up_w),
                    _finite(flexibility.down_w),
                    flexibility.SerializeToString(),
                )
            )
        elif kind == "gap":
            gap = record.gap
            rows.gaps.append(
                GapRow(
                    gateway_id,
                    seq,
                    through_seq,
                    gap.what,
                    gap.records,
                    gap.points,
                    gap.bytes,
                    ns_from_timestamp(gap.first_time) if gap.HasField("first_time") else None,
                    ns_from_timestamp(gap.last_time) if gap.HasField("last_time") else None,
                    gap.reason,
                    ",".join(gap.device_ids),
                )
            )
        elif kind == "clock_sync":
            sync = record.clock_sync
            if not sync.boot_id:
                raise ProtocolViolation(f"record seq {seq}: clock_sync.boot_id is empty")
            rows.clock_syncs.append(
                ClockSyncRow(
                    gateway_id,
                    seq,
                    sync.boot_id,
                    sync.wall_minus_mono_ns,
                    ns_from_timestamp(sync.time),
                )
            )
        else:
            # No known body: a record kind added to v1 after this headend was built. Keep the
            # bytes (and ack them) so nothing is lost and a newer headend can decode them.
            rows.unknown.append(UnknownRecordRow(gateway_id, seq, record.SerializeToString()))
    if expected - 1 != batch.last_seq:
        raise ProtocolViolation(
            f"telemetry batch says seqs {first_seq}..{batch.last_seq} but carries {count} "
            f"records ending at seq {expected - 1}"
        )
    rows.latest_points = _latest_points(gateway_id, samples)
    rows.sample_status = [
        SampleStatusRow(
            gateway_id,
            sample.device_id,
            time_ns,
            seq,
            int(not sample.error and _GOOD in sample.quality),
            sample.error,
        )
        for seq, time_ns, sample in newest.values()
    ]
    return rows


def _latest_points(
    gateway_id: str, samples: list[tuple[int, int, pb.DeviceSample]]
) -> list[LatestPointRow]:
    """The newest value of every (device, point) in the batch.

    Walks the reads newest first and skips a read whose point names a newer read of the same
    device already covered, so a batch of many reads with the same layout costs one pass over
    one read per device, not one Python step per point. The newest read of a device (usually
    the only one: a live batch) becomes its rows in one pass of C-level iterators.
    """
    latest: list[LatestPointRow] = []
    layouts_seen: dict[str, set[tuple[str, ...]]] = {}
    points_taken: dict[str, set[str]] = {}
    for seq, time_ns, sample in reversed(samples):
        device_id = sample.device_id
        layout = tuple(sample.names)
        layouts = layouts_seen.get(device_id)
        if layouts is None:
            taken = set(layout)
            if len(taken) == len(layout):
                layouts_seen[device_id] = {layout}
                points_taken[device_id] = taken
                latest.extend(_point_rows(gateway_id, device_id, layout, sample, time_ns, seq))
                continue
            layouts = layouts_seen[device_id] = set()
        if layout in layouts:
            continue
        layouts.add(layout)
        taken = points_taken.setdefault(device_id, set())
        units = sample.units
        qualities = sample.quality
        values = sample.values
        for index, name in enumerate(layout):
            if name in taken:
                continue
            taken.add(name)
            value = values[index]
            latest.append(
                LatestPointRow(
                    gateway_id,
                    device_id,
                    name,
                    value if math.isfinite(value) else None,
                    units[index] if units else "",
                    qualities[index] if qualities else pb.QUALITY_UNSPECIFIED,
                    time_ns,
                    seq,
                )
            )
    return latest


# LatestPointRow from a tuple of its fields without a Python-level __new__ call per row.
_latest_point_row = functools.partial(tuple.__new__, LatestPointRow)


def _point_rows(
    gateway_id: str,
    device_id: str,
    names: tuple[str, ...],
    sample: pb.DeviceSample,
    time_ns: int,
    seq: int,
) -> Iterator[LatestPointRow]:
    """One row per point of a read whose point names are unique (shape already checked)."""
    count = len(names)
    values: list[float | None] = list(sample.values)
    if not all(map(math.isfinite, values)):  # type: ignore[arg-type]
        values = [_finite(value) for value in sample.values]
    units: Iterable[str] = sample.units or repeat("", count)
    qualities: Iterable[int] = sample.quality or repeat(pb.QUALITY_UNSPECIFIED, count)
    rows = zip(
        repeat(gateway_id, count),
        repeat(device_id, count),
        names,
        values,
        units,
        qualities,
        repeat(time_ns, count),
        repeat(seq, count),
        strict=False,
    )
    return map(_latest_point_row, rows)


# The packed form of a device's latest points: compact JSON (values are finite floats or None,
# exact in JSON; PostgreSQL may write a whole float without its ".0", `unpack` makes it float).
_pack = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_device_of = itemgetter(0, 1)
_point_of = itemgetter(2)
_seq_of = itemgetter(7)
_SEQ = 5  # index of the seq in a packed point (and in `LatestPointRow[2:]`)
_packed_seq = itemgetter(_SEQ)

# A packed latest row: (names, max_seq, points) - the JSON array of its point names, the largest
# seq of its points, and the points, each `[point, value, unit, quality, time_ns, seq]`.
LatestPack = tuple[str, int, str]


def merge_latest_points(
    rows: Iterable[LatestPointRow], stored: Mapping[tuple[str, str], LatestPack]
) -> list[tuple[str, str, str, int, str]]:
    """(gateway_id, device_id, names, max_seq, points) of every device `rows` touch, by key.

    Each device starts from its stored pack (`stored`, keyed by (gateway_id, device_id); absent
    = none yet) and takes a row's point where the point is new or the row's seq is larger than
    the kept one's: the same outcome as upserting the rows one by one in order with "newer seq
    wins". The usual case - one read of the same points as stored, all newer - replaces the pack
    without decoding it. Sorted, so two transactions writing the same rows cannot deadlock.
    """
    merged: dict[tuple[str, str], list[Sequence[object]] | dict[str, Sequence[object]]] = {}
    for key, group in groupby(rows, _device_of):
        chunk = list(group)
        current = merged.get(key)
        points: dict[str, Sequence[object]]
        if current is None:
            old = stored.get(key)
            names = list(map(_point_of, chunk))
            if len(set(names)) == len(chunk) and (
                old is None or (old[0] == _pack(names) and old[1] < min(map(_seq_of, chunk)))
            ):
                merged[key] = [row[2:] for row in chunk]
                continue
            points = {p[0]: p for p in json.loads(old[2])} if old is not None else {}
        elif isinstance(current, list):
            points = {p[0]: p for p in current}  # type: ignore[misc]
        else:
            points = current
        for row in chunk:
            kept = points.get(row[2])
            if kept is None or row[7] > kept[_SEQ]:  # type: ignore[operator]
                points[row[2]] = row[2:]
        merged[key] = points
    packed: list[tuple[str, str, str, int, str]] = []
    for (gateway_id, device_id), device_points in sorted(merged.items()):
        values = device_points if isinstance(device_points, list) else list(device_points.values())
        packed.append(
            (
                gateway_id,
                device_id,
                _pack([p[0] for p in values]),
                max(map(_packed_seq, values)),
                _pack(values),
            )
        )
    return packed


def pack_latest_reads(
    rows: Iterable[LatestPointRow],
) -> tuple[list[tuple[str, str, str, int, str]], set[tuple[str, str]]]:
    """Split a group's rows for a store that can replace a pack conditionally (PostgreSQL).

    Returns (reads, others): `reads` packs alone, as `merge_latest_points` rows, each device
    whose rows are one read (one seq, each point once) - such a pack may replace a stored one of
    the same `names` and an older `max_seq` as it is - and `others` the keys of every other
    device, whose rows must be merged with the stored pack.
    """
    reads: dict[tuple[str, str], tuple[list[str], int, list[LatestPointRow]]] = {}
    others: set[tuple[str, str]] = set()
    for key, group in groupby(rows, _device_of):
        chunk = list(group)
        if key in others:
            continue
        names = list(map(_point_of, chunk))
        seqs = set(map(_seq_of, chunk))
        if key in reads or len(seqs) != 1 or len(set(names)) != len(chunk):
            reads.pop(key, None)
            others.add(key)
            continue
        reads[key] = (names, seqs.pop(), chunk)
    packed = [
        (gateway_id, device_id, _pack(names), seq, _pack([row[2:] for row in chunk]))
        for (gateway_id, device_id), (names, seq, chunk) in sorted(reads.items())
    ]
    return packed, others


def unpack_latest_points(
    rows: Iterable[tuple[str, str, str]], point: str | None = None
) -> list[LatestPoint]:
    """The points of packed (gateway_id, device_id, points) rows (only `point`, if given), in
    (device_id, point, gateway_id) order."""
    latest = [
        LatestPoint(
            gateway_id,
            device_id,
            name,
            None if value is None else float(value),
            unit,
            quality,
            time_ns,
            seq,
        )
        for gateway_id, device_id, packed in rows
        for name, value, unit, quality, time_ns, seq in json.loads(packed)
        if point is None or name == point
    ]
    latest.sort(key=_latest_order)
    return latest


def _latest_order(point: LatestPoint) -> tuple[str, str, str]:
    return (point.device_id, point.point, point.gateway_id)


def _finite(value: float) -> float | None:
    # NaN means "unknown" on the wire; it is kept (and shown) as None, never summed as a number.
    return value if math.isfinite(value) else None


def flexibility_record(gateway_id: str, seq: int, payload: bytes) -> FlexibilityRecord:
    """A stored Flexibility report as plain data (forecast points sorted by offset)."""
    message = pb.Flexibility.FromString(payload)
    points = sorted(
        (
            ForecastPointRecord(
                point.offset_s,
                _finite(point.pv_w),
                _finite(point.load_w),
                _finite(point.battery_energy_wh),
            )
            for point in message.forecast
        ),
        key=lambda point: point.offset_s,
    )
    return FlexibilityRecord(
        gateway_id=gateway_id,
        seq=seq,
        time_ns=ns_from_timestamp(message.time),
        up_w=_finite(message.up_w),
        down_w=_finite(message.down_w),
        pv_w=_finite(message.pv_w),
        load_w=_finite(message.load_w),
        battery_w=_finite(message.battery_w),
        battery_energy_wh=_finite(message.battery_energy_wh),
        battery_capacity_wh=_finite(message.battery_capacity_wh),
        forecast=tuple(points),
    )


def sample_points(
    sample: pb.DeviceSample, point: str | None
) -> Iterable[tuple[int, str, str, float | None, int]]:
    """(index, name, unit, value, quality) of each point of a stored sample, or of one point."""
    names = sample.names
    units = sample.units
    qualities = sample.quality
    values = sample.values
    indexes: Iterable[int]
    if point is None:
        indexes = range(len(names))
    else:
        indexes = [index for index, name in enumerate(names) if name == point]
    for index in indexes:
        value = values[index]
        yield (
            index,
            names[index],
            units[index] if units else "",
            value if math.isfinite(value) else None,
            qualities[index] if qualities else pb.QUALITY_UNSPECIFIED,
        )
