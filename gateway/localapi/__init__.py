"""The gateway's local API: newline-delimited JSON on a Unix socket (`[local_api]`).

`schema` holds the wire models, `client` an async client, `server` the gateway side.
"""
