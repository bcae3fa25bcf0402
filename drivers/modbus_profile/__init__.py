"""Generic Modbus driver (TCP or RTU) executing a device profile (TOML data, drivers/profiles)."""
