"""A proxyless grpcio client joins the mesh with a certificate the control plane issued, as
docs/identity.md ("CA operations") tells an operator to do it:

`meshctl ca issue` writes key.pem, cert.pem and bundle.pem; the client's xDS bootstrap names
them in a `file_watcher` certificate provider (gRFC A29); the cluster it is sent carries an
UpstreamTlsContext that refers to that provider for its own certificate and for the roots, and
requires the server's SPIFFE ID. The server is a TLS gRPC server holding a certificate of the
same CA and requiring client certificates, as a sidecar's inbound port does.

Checked: the call succeeds over mTLS and the server sees the client's SPIFFE ID in the peer
certificate; a server with another service's certificate is refused by the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from control_plane.xds.protocol import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from tests.component.test_ads import (
    AdsThread,
    DictProvider,
    api_listener,
    eds_cluster,
    load_assignment,
    route_config,
)
from tests.component.test_ca_api import DOMAIN, CaUnderTest, _pem_key, new_csr
from tests.component.test_meshctl import meshctl, ok
from tests.harness import ROOT

SERVICE = "greeter"
PROVIDER = "mesh-identity"  # the certificate provider instance name, bootstrap <-> cluster

CLIENT = r"""
import sys
import grpc
import grpc.experimental
creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
with grpc.secure_channel(sys.argv[1], creds) as channel:
    try:
        answer = channel.unary_unary("/test.Who/Ami")(b"", timeout=10,
                                                      wait_for_ready=sys.argv[2] == "wait")
        print("OK " + answer.decode(), flush=True)
    except grpc.RpcError as err:
        print(f"FAILED {err.code().name}: {err.details()}", flush=True)
"""


def tls_cluster(name: str, server_spiffe_id: str):  # type: ignore[no-untyped-def]
    """The EDS cluster with mTLS from the bootstrap's certificate provider (what translation
    would send a proxyless client of a mesh in STRICT or PERMISSIVE mode)."""
    cluster = eds_cluster(name)
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    common.tls_certificate_provider_instance.instance_name = PROVIDER
    validation = common.validation_context
    validation.ca_certificate_provider_instance.instance_name = PROVIDER
    validation.match_subject_alt_names.add().exact = server_spiffe_id
    cluster.transport_socket.name = "envoy.transport_sockets.tls"
    cluster.transport_socket.typed_config.Pack(context)
    return cluster


class WhoAmI:
    """A TLS gRPC server that requires a client certificate and answers with the caller's
    URI SANs (as the auth context has them from the verified peer certificate)."""

    def __init__(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(2),
                                  options=[("grpc.so_reuseport", 0)])
        self.calls = 0
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Who", {"Ami": grpc.unary_unary_rpc_method_handler(self._whoami)}),))
        creds = grpc.ssl_server_credentials([(key_pem, chain_pem)], root_certificates=bundle_pem,
                                            require_client_auth=True)
        self.address = f"127.0.0.1:{self.server.add_secure_port('127.0.0.1:0', creds)}"
        self.server.start()

    def _whoami(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        sans = context.auth_context().get("x509_subject_alternative_name", [])
        return b",".join(s for s in sans if s.startswith(b"spiffe://"))

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[CaUnderTest]:
    cp = CaUnderTest(tmp_path / "state")
    try:
        yield cp
    finally:
        cp.stop()


def serve(plane: CaUnderTest, service: str) -> WhoAmI:
    token, _ = plane.create_token(service)
    key, csr = new_csr(service)
    issued = plane.sign(csr, token)
    return WhoAmI(_pem_key(key), issued.certificate_pem.encode(),
                  "".join(issued.trust_bundle_pem).encode())


def run_client(ads_address: str, identity: Path, workdir: Path, wait: bool = True) -> str:
    """One call from a fresh grpcio process (its xDS bootstrap is read once per process).
    wait: wait for a ready connection (else a failed handshake fails the call at once)."""
    bootstrap = workdir / "bootstrap.json"
    bootstrap.write_text(json.dumps({
        "xds_servers": [{"server_uri": ads_address, "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": "reports~proxyless-1", "cluster": "reports"},
        "certificate_providers": {PROVIDER: {"plugin_name": "file_watcher", "config": {
            "certificate_file": str(identity / "cert.pem"),
            "private_key_file": str(identity / "key.pem"),
            "ca_certificate_file": str(identity / "bundle.pem"),
            "refresh_interval": "60s"}}},
    }))
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]))
    result = subprocess.run([sys.executable, "-c", CLIENT, f"xds:///{SERVICE}",
                             "wait" if wait else "fail-fast"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout, f"proxyless client failed:\n{result.stderr[-3000:]}"
    return result.stdout.strip()


def test_a_proxyless_client_calls_over_mtls_with_issued_files(plane: CaUnderTest,
                                                              tmp_path: Path) -> None:
    right = serve(plane, SERVICE)
    impostor = serve(plane, "payments")  # a valid mesh certificate, for another service
    token, _ = plane.create_token("reports")
    identity = tmp_path / "identity"
    ok(meshctl("ca", "issue", "--service", "reports", "--out", str(identity),
               address=plane.address, env={"MESH_TOKEN": token}))
    provider = DictProvider()
    provider.put(LISTENER_TYPE, SERVICE, api_listener(SERVICE))
    provider.put(ROUTE_TYPE, SERVICE, route_config(SERVICE, SERVICE, "", SERVICE))
    provider.put(CLUSTER_TYPE, SERVICE, tls_cluster(SERVICE, f"spiffe://{DOMAIN}/service/"
                                                             f"{SERVICE}"))
    ads = AdsThread(provider)
    try:
        provider.put(ENDPOINT_TYPE, SERVICE,
                     load_assignment(SERVICE, {"z": (1, [right.address])}))
        assert run_client(ads.address, identity, tmp_path) == \
            f"OK spiffe://{DOMAIN}/service/reports"
        assert right.calls == 1

        provider.put(ENDPOINT_TYPE, SERVICE,
                     load_assignment(SERVICE, {"z": (1, [impostor.address])}))
        ads._run(_changed(ads))  # the ADS server caches what it sent
        answer = run_client(ads.address, identity, tmp_path, wait=False)
        assert answer.startswith("FAILED UNAVAILABLE"), answer
        assert "SANs from certificate did not match" in answer
        assert impostor.calls == 0
    finally:
        ads.stop()
        with contextlib.suppress(Exception):
            right.stop()
            impostor.stop()


async def _changed(ads: AdsThread) -> None:
    ads.ads.notify_changed()
