"""The sidecar's workload identity from the mesh CA, and what the rest of the sidecar needs
from it: server credentials for the mTLS inbound listener, client credentials for the upstream
pool, the trust bundle delivered with the config, and a status for /ready and /config_dump.

The CA is the control plane's CertificateService, reached on the same address as ADS; the
bootstrap token says which service names this sidecar may claim (docs/identity.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc

from sidecar.identity import (
    CertificateSource,
    GrpcSigner,
    Identity,
    IdentityError,
    read_token,
)
from sidecar.tls import UpstreamTls, server_credentials_from_start

log = logging.getLogger(__name__)


class WorkloadIdentity:
    def __init__(self, service: str, control_plane: str, token: str | None,
                 token_file: str | None) -> None:
        self._service = service
        self._control_plane = control_plane
        self._token = read_token(token, token_file)  # IdentityError: a clear message, exit 2
        self._channel: grpc.aio.Channel | None = None
        self.source: CertificateSource | None = None
        self.upstream: UpstreamTls | None = None

    def start(self, on_change: Callable[[Identity], None]) -> None:
        """Ask for the first certificate now and renew it from then on (on the running loop)."""
        self._channel = grpc.aio.insecure_channel(self._control_plane)
        # The roots come with each certificate and with every config push, so no polling.
        self.source = CertificateSource(self._service, "", GrpcSigner(self._channel, self._token),
                                        bundle_interval=None)
        self.source.subscribe(on_change)
        self.upstream = UpstreamTls(self.source, "")
        self.source.start()

    async def first_certificate(self) -> None:
        """Returns once the CA has issued the first certificate (waits as long as it takes)."""
        assert self.source is not None
        if self.source.current() is None:
            log.info("%s: not announcing this instance until the CA issues its certificate",
                     self._service)
        while self.source.current() is None:
            with contextlib.suppress(IdentityError):
                await self.source.wait_ready(3600.0)

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.source is not None
        return server_credentials_from_start(self.source)

    def current(self) -> Identity | None:
        return self.source.current() if self.source is not None else None

    def replace_trust_bundle(self, roots: tuple[bytes, ...]) -> bool:
        return self.source.replace_trust_bundle(roots) if self.source is not None else False

    def not_ready(self) -> str | None:
        """Why the sidecar cannot do mTLS yet (None once it has a certificate)."""
        if self.current() is not None:
            return None
        error = self.source.last_error if self.source is not None else None
        return "waiting for a workload certificate" + (f": {error}" if error else "")

    def status(self) -> dict[str, Any]:
        identity = self.current()
        source = self.source
        out: dict[str, Any] = {
            "spiffe_id": source.spiffe_id if source is not None else "",
            "last_error": source.last_error if source is not None else None,
            "next_renewal_at": source.next_refresh_at if source is not None else None,
        }
        if identity is not None:
            out.update(serial=f"{identity.serial:x}", not_before=identity.not_before,
                       not_after=identity.not_after,
                       trust_bundle_roots=len(identity.trust_bundle_pem))
        return out

    async def close(self) -> None:
        if self.source is not None:
            await self.source.close()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
