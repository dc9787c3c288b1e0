"""A sidecar started with a bootstrap token fails closed until the control plane has spoken: its
plaintext inbound port refuses calls (the mode is not known yet, so STRICT is assumed) and its
mTLS port has no certificate to serve; nothing reaches the app."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.harness import start_sidecar
from tests.servers import IdentityServer, call_raw


def test_a_sidecar_with_a_token_and_no_control_plane_lets_nothing_through(
        tmp_path: Path) -> None:
    app = IdentityServer("orders-1")
    sidecar = start_sidecar(service="orders", app=app.address,
                            extra=["--control-plane", "127.0.0.1:1", "--state-dir",
                                   str(tmp_path), "--no-learn-method-shapes",
                                   "--grpc-service", "shop.Orders"],
                            env={"MESH_TOKEN": "pmt_not-checked-yet"})
    try:
        with pytest.raises(grpc.RpcError) as plaintext:
            call_raw(sidecar.addr("inbound_plaintext"), "/shop.Orders/Get", timeout=5)
        assert plaintext.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "fails closed" in (plaintext.value.details() or "")
        with pytest.raises(grpc.RpcError) as mtls_port:  # no certificate: handshake fails
            call_raw(sidecar.addr("inbound"), "/shop.Orders/Get", timeout=5)
        assert mtls_port.value.code() is grpc.StatusCode.UNAVAILABLE
        assert app.calls == 0
    finally:
        sidecar.stop()
        app.stop()
