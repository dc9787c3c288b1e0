"""Pieces of the workload-identity end-to-end tests (issue 5, tests/e2e/test_identity.py).

Real processes and real TLS: the control plane (with its CA) as a child process, sidecars with
bootstrap tokens, certificates issued by `meshctl ca issue` exactly as a user gets them, and
grpcio channels from the test process that present whatever certificate a test needs (the
mesh's, another CA's, an expired one under the mesh's own root, none). The app behind a sidecar
counts every call it receives, so a refusal can be shown to have stopped at the sidecar.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from tests.e2e.cp_fixtures import ControlPlane, child_env, http_get, meshctl
from tests.harness import ManagedProcess, wait_for
from tests.pki import LoadedCA

TRUST_DOMAIN = "pymesh.local"  # MeshConfig spec.trustDomain default


def spiffe(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/service/{service}"


def server_name(service: str) -> str:
    """The DNS SAN of a service's certificate: what a caller checks the server against."""
    return f"{service}.svc.{TRUST_DOMAIN}"


# --- the control plane with a chosen workload TTL --------------------------------------------
class CaControlPlane(ControlPlane):
    """The control plane with `--cert-ttl` (ControlPlane starts it with the default 24 h)."""

    def __init__(self, state_dir: Path, *, cert_ttl: str) -> None:
        self.cert_ttl = cert_ttl
        super().__init__(state_dir)

    def _spawn(self, listen: str) -> ManagedProcess:
        argv = [sys.executable, "-m", "control_plane", "--listen", listen,
                "--admin", "127.0.0.1:0", "--state-dir", str(self.state_dir),
                "--cert-ttl", self.cert_ttl]
        return ManagedProcess(argv, "control-plane", env=child_env())

    def signing_root(self) -> LoadedCA:
        """The root that signs now, with its key, from the CA's state (`ca/roots.json`, see
        control_plane/ca/roots.py): the newest root holding a key whose time to sign has
        come."""
        doc = json.loads((self.state_dir / "ca" / "roots.json").read_bytes())
        now = time.time()
        for root in reversed(doc["roots"]):
            if root.get("key") and root["sign_from"] <= now:
                first = root["certificates"].split("-----END CERTIFICATE-----")[0]
                cert = (first + "-----END CERTIFICATE-----\n").encode()
                return LoadedCA(cert, root["key"].encode(), TRUST_DOMAIN)
        raise AssertionError(f"no signing root in {doc}")


def create_token(control_plane: str, *services: str) -> tuple[str, str]:
    """(token, id) from `meshctl token create`."""
    args = [a for s in services for a in ("--service", s)]
    created = meshctl(control_plane, "token", "create", *args, "-o", "json")
    assert created.code == 0, str(created)
    doc = json.loads(created.out)
    return doc["token"], doc["id"]


# --- certificates for the test process's own calls --------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """What a grpcio client presents (key + chain; both empty: no client certificate) and the
    roots it verifies the server with."""

    key: bytes | None
    chain: bytes | None
    bundle: bytes

    def channel(self, target: str, service: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.bundle,
                                             private_key=self.key,
                                             certificate_chain=self.chain)
        # one fresh connection per channel: every call below makes its own handshake
        return grpc.secure_channel(target, creds, options=[
            ("grpc.ssl_target_name_override", server_name(service)),
            ("grpc.use_local_subchannel_pool", 1)])

    def call(self, target: str, method: str, *, service: str,
             metadata: Sequence[tuple[str, str]] = (), timeout: float = 5.0) -> bytes:
        with self.channel(target, service) as channel:
            answer: bytes = channel.unary_unary(method)(b"", metadata=metadata,
                                                        timeout=timeout)
            return answer


class Issuer:
    """Mesh certificates for the test process, from `meshctl ca issue` (the CA's real Sign
    path), re-issued once less than `min_left` seconds of one remain (the module runs with a
    one-minute workload TTL)."""

    def __init__(self, control_plane: str, token: str, workdir: Path,
                 min_left: float = 25.0) -> None:
        self.control_plane = control_plane
        self.token = token
        self.workdir = workdir
        self.min_left = min_left
        self._cache: dict[str, tuple[Credentials, float]] = {}

    def credentials(self, service: str) -> Credentials:
        cached = self._cache.get(service)
        if cached is not None and cached[1] - time.time() > self.min_left:
            return cached[0]
        out = self.workdir / f"{service}-{time.monotonic_ns()}"
        issued = meshctl(self.control_plane, "ca", "issue", "--service", service,
                         "--out", str(out), env={"MESH_TOKEN": self.token})
        assert issued.code == 0, str(issued)
        chain = (out / "cert.pem").read_bytes()
        leaf = x509.load_pem_x509_certificate(chain)
        creds = Credentials((out / "key.pem").read_bytes(), chain,
                            (out / "bundle.pem").read_bytes())
        self._cache[service] = (creds, leaf.not_valid_after_utc.timestamp())
        return creds

    def forget(self) -> None:
        """Issue anew on the next use (e.g. after a root rotation, for the new bundle)."""
        self._cache.clear()

    def peer_certificate(self, target: str, service: str) -> x509.Certificate:
        """The certificate a sidecar's mTLS port presents to a client holding this
        service's mesh certificate (a TLS handshake from Python's ssl, ALPN h2 as gRPC)."""
        creds = self.credentials("frontend")
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for name, data in (("key", creds.key), ("chain", creds.chain),
                               ("bundle", creds.bundle)):
                paths[name] = os.path.join(tmp, name)
                with open(paths[name], "wb") as f:
                    f.write(data or b"")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(paths["bundle"])
            context.load_cert_chain(paths["chain"], paths["key"])
        context.set_alpn_protocols(["h2"])
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=server_name(service)) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def bundle(self) -> bytes:
        """The mesh's trust bundle (to verify a sidecar's server certificate)."""
        return self.credentials("frontend").bundle


# --- the app ----------------------------------------------------------------------------------
class EchoApp:
    """The app behind a sidecar: answers unary methods of its gRPC service with its name and
    echoes every message of the bidirectional `Chat` method. It counts every call it gets
    (streams too) and keeps the metadata of the last one. Other methods (the sidecar's
    reflection probe) are UNIMPLEMENTED, so the sidecars proxy its methods as streams."""

    def __init__(self, name: str, grpc_service: str) -> None:
        self.name = name
        self.grpc_service = grpc_service
        self.chat = f"/{grpc_service}/Chat"
        self.calls = 0
        self.last_metadata: dict[str, str | bytes] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                   options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        if method == self.chat:
            return grpc.stream_stream_rpc_method_handler(self._echo)
        if method.startswith(f"/{self.grpc_service}/"):
            return grpc.unary_unary_rpc_method_handler(self._answer)
        return None

    def _count(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls += 1
            self.last_metadata = dict(context.invocation_metadata())

    def _answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count(context)
        return self.name.encode()

    def _echo(self, requests, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        self._count(context)
        yield from requests

    def caller(self) -> str | bytes | None:
        return self.last_metadata.get("x-forwarded-client-cert")

    def stop(self) -> None:
        self._server.stop(0)


class EchoStream:
    """One long bidirectional stream through `target`: a message every `interval`, each of
    which must come back unchanged within `reply_timeout`. Bounded by `max_seconds` (the
    stream's deadline is a little later)."""

    def __init__(self, target: str, method: str, *, interval: float = 0.05,
                 reply_timeout: float = 5.0, max_seconds: float = 75.0) -> None:
        self.errors: list[str] = []
        self.echoed = 0
        self._interval = interval
        self._reply_timeout = reply_timeout
        self._max_seconds = max_seconds
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        self._replies: queue.Queue[bytes | BaseException | None] = queue.Queue()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._channel = grpc.insecure_channel(target)
        self._call = self._channel.stream_stream(method)(
            iter(self._requests.get, None), timeout=max_seconds + 15)
        self._reader = threading.Thread(target=self._read, name="stream-read", daemon=True)
        self._writer = threading.Thread(target=self._write, name="stream-write", daemon=True)
        self._reader.start()
        self._writer.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
        except grpc.RpcError as err:
            self._replies.put(err)
        self._replies.put(None)

    def _write(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            message = f"message-{n}".encode()
            self._requests.put(message)
            try:
                reply = self._replies.get(timeout=self._reply_timeout)
            except queue.Empty:
                self._fail(f"no echo of {message!r} within {self._reply_timeout}s")
                return
            if reply != message:
                self._fail(f"sent {message!r}, got {reply!r}")
                return
            with self._cond:
                self.echoed += 1
                self._cond.notify_all()
            n += 1
            self._stop.wait(self._interval)

    def _fail(self, what: str) -> None:
        with self._cond:
            self.errors.append(what)
            self._cond.notify_all()

    @property
    def open(self) -> bool:
        """Still echoing: no error, and neither side has ended the stream."""
        return not self.errors and self._writer.is_alive() and self._reader.is_alive()

    def wait_echoed(self, count: int, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        with self._cond:
            while self.echoed < count:
                left = end - time.monotonic()
                if left <= 0 or self.errors:
                    raise AssertionError(f"stream echoed {self.echoed} of {count}: "
                                         f"{self.errors}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> grpc.StatusCode:
        """End the stream from the client side; the status the server ended it with."""
        self._stop.set()
        self._writer.join(self._reply_timeout + 1)
        self._requests.put(None)
        self._reader.join(10)
        code: grpc.StatusCode = self._call.code()
        self._channel.close()
        return code


# --- what a sidecar shows ---------------------------------------------------------------------
def config_dump(sidecar: ManagedProcess) -> dict[str, object]:
    status, body = http_get(sidecar.addr("admin"), "/config_dump")
    assert status == 200, body
    dump: dict[str, object] = json.loads(body)
    return dump


def identity(sidecar: ManagedProcess) -> dict[str, object]:
    value = config_dump(sidecar).get("identity")
    assert isinstance(value, dict), f"{sidecar.name} has no identity in /config_dump"
    return value


def serial(sidecar: ManagedProcess) -> str:
    value = identity(sidecar).get("serial")
    assert isinstance(value, str) and value, f"{sidecar.name} has no certificate"
    return value


def metric(sidecar: ManagedProcess, name: str) -> list[tuple[str, float]]:
    """Every sample of a metric family on /metrics: (labels text, value)."""
    status, body = http_get(sidecar.addr("admin"), "/metrics")
    assert status == 200, body
    samples = []
    for line in body.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                samples.append((head[len(name):], float(value)))
    return samples


def metric_total(sidecar: ManagedProcess, name: str) -> float:
    return sum(v for _, v in metric(sidecar, name))


def log_mark(process: ManagedProcess) -> int:
    return len(process.output())


def wait_logged(process: ManagedProcess, since: int, text: str, timeout: float = 5.0) -> None:
    """`text` appears in the process's output after `since` (a log_mark). The reason a TLS
    handshake failed is only known to the side that refused it, in its log (grpc-core's
    handshake error line): that is where an operator finds it."""
    wait_for(lambda: text in process.output()[since:], timeout, interval=0.05,
             what=f"{process.name} to log {text!r}")


def wait_ready(sidecar: ManagedProcess, timeout: float = 20.0) -> None:
    wait_for(lambda: http_get(sidecar.addr("admin"), "/ready")[0] == 200, timeout,
             interval=0.05, what=f"{sidecar.name}'s /ready")
