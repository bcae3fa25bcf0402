"""dergw.v1: generated messages (`dergw_pb2`), the gRPC service (`dergw_pb2_grpc`) and helpers.

Size limits are enforced by both ends *before* decoding (gRPC's max message length), so a
hostile or broken peer cannot make either side allocate unbounded memory.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from dergw.v1 import dergw_pb2 as pb

__all__ = [
    "MAX_ABS_WATTS",
    "MAX_ID_LENGTH",
    "MAX_MESSAGE_BYTES",
    "MAX_RANDOMIZE_S",
    "MAX_RECORDS_PER_BATCH",
    "grpc_channel_options",
    "ns_from_timestamp",
    "pb",
    "timestamp_from_ns",
]

# Largest encoded message either end accepts. A full telemetry batch is well below this.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Largest number of records in one TelemetryBatch.
MAX_RECORDS_PER_BATCH = 2000

# Bounds on intent content both ends enforce, so a post the headend accepts is never refused by
# the gateway: ids (gateway, site, device, event) are at most this many characters...
MAX_ID_LENGTH = 128
# ...power values at most 1 GW in magnitude (anything larger is a unit error upstream)...
MAX_ABS_WATTS = 1e9
# ...and event randomization within ±1 h (IEEE 2030.5 OneHourRangeType).
MAX_RANDOMIZE_S = 3600


def timestamp_from_ns(wall_ns: int) -> Timestamp:
    """UTC wall-clock nanoseconds since the epoch → Timestamp."""
    seconds, nanos = divmod(wall_ns, 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)


def ns_from_timestamp(ts: Timestamp) -> int:
    """Timestamp → UTC wall-clock nanoseconds since the epoch."""
    return ts.seconds * 1_000_000_000 + ts.nanos


def grpc_channel_options(*, keepalive_s: float = 20.0) -> list[tuple[str, int]]:
    """Options shared by the gRPC client and server: message bounds and HTTP/2 keepalive."""
    keepalive_ms = int(keepalive_s * 1000)
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", max(1000, keepalive_ms // 2)),
    ]
