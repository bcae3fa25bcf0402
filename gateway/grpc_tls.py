"""gRPC client credentials from the gateway's identity (mTLS to the headend).

    channel = grpc.aio.secure_channel(target, channel_credentials(Identity.load(state_dir)))

Credentials are immutable: after a renewal, build a new channel and drain the old one.
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
