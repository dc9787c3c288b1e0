"""Connect a running sidecar to the control plane: who it is (node identity) and its ADS client.

Kept apart from runtime.py so that a sidecar without a control plane carries none of it.
"""

from __future__ import annotations

import contextlib
import os
import socket

from sidecar import app_services, static_config
from sidecar.config import Settings
from sidecar.runtime import Sidecar
from sidecar.static_config import split_host_port
from sidecar.xds_client import NodeIdentity, XdsClient, default_instance_id

_WILDCARDS = ("0.0.0.0", "::", "")


def advertised_address(inbound: str, control_plane: str) -> str:
    """The inbound HOST:PORT other sidecars can dial: the listener's own host, or for a wildcard
    listener, this host's address on the route to the control plane."""
    host, port = split_host_port(inbound)
    if host not in _WILDCARDS:
        return inbound
    cp_host, cp_port = split_host_port(control_plane)
    family = socket.AF_INET6 if ":" in cp_host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as probe:
        try:
            probe.connect((cp_host, cp_port))  # no packet is sent: it only picks a route
            host = probe.getsockname()[0]
        except OSError:
            host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_state_dir(instance_id: str) -> str:
    return os.path.join(os.path.expanduser("~"), ".pymesh", f"sidecar-{instance_id}")


async def follow_control_plane(sidecar: Sidecar, settings: Settings) -> XdsClient:
    assert settings.control_plane is not None
    inbound = advertised_address(sidecar.addresses["inbound"], settings.control_plane)
    services = settings.grpc_services
    if not services and settings.app:
        services = await app_services.discover(settings.app)
    instance_id = settings.instance_id or default_instance_id(settings.service, inbound)
    plaintext = sidecar.addresses.get("inbound_plaintext")
    identity = NodeIdentity(settings.service, instance_id, inbound, settings.version,
                            settings.zone, tuple(services), mtls=plaintext is not None,
                            plaintext_address=(advertised_address(plaintext,
                                                                  settings.control_plane)
                                               if plaintext else ""))
    state_dir = settings.state_dir or default_state_dir(instance_id)
    os.makedirs(state_dir, exist_ok=True)
    local = static_config.from_flags(settings.service, settings.app, {}, {})
    if not settings.app:
        # A sidecar for a client-only app: the control plane's inbound listener still names
        # the local app cluster; without an app it has no endpoints (calls get UNAVAILABLE).
        local.clusters.append(static_config.static_cluster(static_config.INBOUND_APP_CLUSTER,
                                                           []))
    client = XdsClient(settings.control_plane, identity.to_node(), sidecar.apply,
                       state_dir=state_dir, local=local,
                       before_connect=(sidecar.identity.first_certificate
                                       if sidecar.identity is not None else None))
    sidecar.xds = client
    await client.start()
    return client
