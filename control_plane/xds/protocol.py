"""xDS v3 state of the world, per ADS stream: what was sent, what was ACKed or NACKed, what the
client subscribes to, and when a push is due (SPECS.md §6, docs/control-plane.md "ADS").

Pure and synchronous: the asyncio shell (ads_server.py) feeds requests in and asks, per type,
whether a response with a given version should go out. Time is a number passed in, so tests
drive it with a fake clock.

Rules, per stream and type URL:
- a request whose response_nonce is the last sent nonce answers that push: with error_detail
  it is a NACK, otherwise an ACK of the version sent with that nonce;
- a request with an older nonce is stale: only its resource names are recorded;
- a request with no nonce is a (re)subscription and is always answered;
- a push is due when the computed version differs from the last sent one, or the subscribed
  names changed since then, or the subscription is new, and never while the previous push of
  that type awaits its ACK/NACK (one response in flight per type: the client never has to
  reconcile two unanswered versions, and a burst of changes collapses into one push).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from control_plane.status_api import ProxyInfo, TypeStatus

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# Make before break: clusters and their endpoints before the listeners and routes using them.
PUSH_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
_PARENT = {ENDPOINT_TYPE: CLUSTER_TYPE, ROUTE_TYPE: LISTENER_TYPE}
WILDCARD_TYPES = frozenset({LISTENER_TYPE, CLUSTER_TYPE})
SHORT_NAMES = {LISTENER_TYPE: "LDS", ROUTE_TYPE: "RDS", CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS"}
WILDCARD_NAME = "*"

# Names a stream subscribes to for one type: None is "everything" (wildcard).
Subscription = frozenset[str] | None


class ProtocolError(ValueError):
    """A request the stream cannot go on with; the server ends the stream INVALID_ARGUMENT."""


class RequestKind(enum.Enum):
    SUBSCRIBE = "subscribe"  # no nonce: a new (or renewed) subscription
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # answers an older push; only its resource names count


@dataclass
class _TypeState:
    type_url: str
    wildcard: bool = False
    names: frozenset[str] = frozenset()
    force: bool = True  # answer the next evaluation even if nothing changed
    awaiting: bool = False  # a push is out and not yet ACKed or NACKed
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float | None = None
    sent_subscription: Subscription = frozenset()
    sent_revision: int = 0
    acked_version: str = ""
    acked_at: float | None = None
    acked_revision: int = 0
    nack_nonce: str = ""
    nack_error: str = ""
    nacked_at: float | None = None

    @property
    def subscription(self) -> Subscription:
        return None if self.wildcard else self.names

    def status(self) -> TypeStatus:
        return TypeStatus(type_url=self.type_url, sent_version=self.sent_version,
                          sent_nonce=self.sent_nonce, sent_at=self.sent_at,
                          acked_version=self.acked_version, acked_at=self.acked_at,
                          nack_nonce=self.nack_nonce, nack_error=self.nack_error,
                          nacked_at=self.nacked_at, sent_policy_revision=self.sent_revision,
                          acked_policy_revision=self.acked_revision)


class StreamState:
    """One ADS stream. Not thread-safe: one event loop owns it."""

    def __init__(self, stream_id: int, connected_since: float) -> None:
        self.stream_id = stream_id
        self.connected_since = connected_since
        self.node: base_pb2.Node | None = None
        self._types: dict[str, _TypeState] = {}

    # --- requests -----------------------------------------------------------------------
    def on_request(self, request: discovery_pb2.DiscoveryRequest, now: float) -> RequestKind:
        """Record a request. Raises ProtocolError for one the stream cannot continue after."""
        if self.node is None:
            if not request.HasField("node") or not request.node.id:
                raise ProtocolError("node: the first request on a stream must carry node.id")
            node = base_pb2.Node()
            node.CopyFrom(request.node)
            self.node = node
        if not request.type_url:
            raise ProtocolError("type_url: required on every request")
        state = self._types.get(request.type_url)
        first = state is None
        if state is None:
            state = self._types[request.type_url] = _TypeState(request.type_url)
        _set_names(state, request.resource_names, first)

        nonce = request.response_nonce
        if not nonce:
            state.force = True
            state.awaiting = False
            return RequestKind.SUBSCRIBE
        if nonce != state.sent_nonce:
            return RequestKind.STALE
        state.awaiting = False
        if request.HasField("error_detail"):
            state.nack_nonce = nonce
            state.nack_error = (request.error_detail.message
                                or f"(no message; code {request.error_detail.code})")
            state.nacked_at = now
            return RequestKind.NACK
        state.acked_version = state.sent_version
        state.acked_at = now
        state.acked_revision = state.sent_revision
        return RequestKind.ACK

    # --- pushes -------------------------------------------------------------------------
    def subscribed_types(self) -> list[str]:
        """Types to evaluate, in push order (make before break), then any others."""
        ordered = [t for t in PUSH_ORDER if t in self._types]
        return ordered + sorted(t for t in self._types if t not in PUSH_ORDER)

    def subscription(self, type_url: str) -> Subscription:
        return self._types[type_url].subscription

    def may_push(self, type_url: str) -> bool:
        """Subscribed to something, no push of this type awaits its answer, and no push of its
        parent type does: an unanswered CDS (LDS) push is about to change which EDS (RDS)
        names the proxy wants, so pushing the children now would be wasted (sent twice)."""
        state = self._types.get(type_url)
        if state is None or state.awaiting:
            return False
        parent = self._types.get(_PARENT.get(type_url, ""))
        if parent is not None and parent.awaiting:
            return False
        return state.wildcard or bool(state.names)

    def needs_push(self, type_url: str, version: str) -> bool:
        if not self.may_push(type_url):
            return False
        state = self._types[type_url]
        return (state.force or version != state.sent_version
                or state.subscription != state.sent_subscription)

    def still_current(self, type_url: str, version: str, revision: int) -> None:
        """A new policy revision left this type's content unchanged: what the proxy ACKed is
        also the config of `revision` (status pages can then say it runs that revision)."""
        state = self._types.get(type_url)
        if (state is not None and not state.awaiting and state.acked_version == version
                and revision > state.acked_revision):
            state.acked_revision = revision
            state.sent_revision = max(state.sent_revision, revision)

    def record_push(self, type_url: str, version: str, nonce: str, now: float,
                    revision: int = 0) -> None:
        state = self._types[type_url]
        state.sent_version = version
        state.sent_nonce = nonce
        state.sent_at = now
        state.sent_subscription = state.subscription
        state.sent_revision = revision
        state.awaiting = True
        state.force = False

    def awaiting(self, type_url: str) -> bool:
        state = self._types.get(type_url)
        return state is not None and state.awaiting

    # --- status -------------------------------------------------------------------------
    def type_status(self, type_url: str) -> TypeStatus | None:
        state = self._types.get(type_url)
        return state.status() if state else None

    def status(self) -> ProxyInfo | None:
        """The record the status API shows; None until the stream has identified itself."""
        if self.node is None:
            return None
        service, instance_id, sidecar = node_summary(self.node)
        return ProxyInfo(node_id=self.node.id, service=service, instance_id=instance_id,
                         connected_since=self.connected_since, sidecar=sidecar,
                         types=tuple(self._types[t].status() for t in self.subscribed_types()))


def _set_names(state: _TypeState, names: Iterable[str], first: bool) -> None:
    """Wildcard: "*" explicitly, or no names on the first LDS/CDS request (legacy). Once in
    legacy wildcard mode, an empty list keeps it; a non-wildcard stream that sends an empty list
    unsubscribes from everything of that type."""
    requested = frozenset(names)
    explicit = WILDCARD_NAME in requested
    requested -= {WILDCARD_NAME}
    if explicit:
        state.wildcard = True
    elif not requested:
        state.wildcard = (first and state.type_url in WILDCARD_TYPES) or state.wildcard
    else:
        state.wildcard = False
    state.names = requested


def version_of(named: Iterable[tuple[str, any_pb2.Any]]) -> str:
    """The version of one type's resources for one node: equal sets, equal versions, on every
    replica and across restarts (the Anys must be packed deterministically)."""
    digest = hashlib.sha256()
    for name, packed in sorted(named, key=lambda item: item[0]):
        data = packed.SerializeToString(deterministic=True)
        digest.update(len(name).to_bytes(4, "big") + name.encode())
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


def node_summary(node: base_pb2.Node) -> tuple[str, str, bool]:
    """(service, instance id, is a mesh sidecar) for status, tolerant of any metadata: a node
    that cannot describe itself is still shown (docs/control-plane.md "Node identity")."""
    fields = node.metadata.fields
    sidecar_value = fields.get("mesh_sidecar")
    sidecar = sidecar_value is not None and (
        sidecar_value.bool_value or sidecar_value.string_value.lower() == "true")

    def text(key: str) -> str:
        value = fields.get(key)
        return value.string_value if value is not None else ""

    service = text("service") or node.cluster
    instance_id = text("instance_id")
    if not instance_id and "~" in node.id:
        instance_id = node.id.split("~", 1)[1]
    return service, instance_id, sidecar
