"""DNP3 (IEEE 1815.2 / AN2018-001) driver: a master in a child process, dnp3py or pydnp3 inside."""
