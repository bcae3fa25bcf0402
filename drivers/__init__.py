"""Field-protocol drivers behind one async contract (drivers.contract)."""
