"""OPC UA driver (asyncua): subscription-fed reads, verified writes, secure by default."""
