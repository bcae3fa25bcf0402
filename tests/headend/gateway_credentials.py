"""grpcio client credentials from a gateway identity, for tests that act as a gateway with grpcio.

The gateway's own uplink is grpclib with `Identity.ssl_context()` and never imports grpcio; these
tests speak to the headend through grpcio's client to pin its server side independently.
"""

from __future__ import annotations

import grpc

from gateway.identity import Identity

__all__ = ["channel_credentials"]


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Trust the headend CA and present this gateway's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.private_key_pem,
        certificate_chain=identity.certificate_pem,
    )
