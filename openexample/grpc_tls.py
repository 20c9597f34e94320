"""gRPC credentials from :class:`~openexample.tls.TlsFiles`: the one module of the shared
package that imports grpc (a shell for both planes, like the generated ``*_pb2_grpc``)."""

from __future__ import annotations

import grpc

from openexample.tls import TlsFiles


def grpc_server_credentials(
    files: TlsFiles, *, require_client_cert: bool = True
) -> grpc.ServerCredentials:
    """Our certificate; with ``require_client_cert`` every client must present one signed
    by the CA (mTLS). grpc-python has no "request but do not require" mode."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_cert
    )


def grpc_channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Verify the server against the CA, present our certificate."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
