"""The dergw wire contract. `dergw.v1` holds the generated protobuf/gRPC code and thin helpers.

This is the only code that `gateway/` and `headend_min/` share.
"""
