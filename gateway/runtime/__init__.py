"""The gateway process at runtime: supervisor, device pollers, control loop, uplink (I/O edge)."""
