"""Every protobuf type the mesh's xDS resources carry inside an Any, loaded into the process.

json_format (used by /config_dump and the persisted snapshot) can only expand an Any whose type
is known to the process; importing the modules registers them.
"""

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

LOADED = (fault_pb2, local_rate_limit_pb2, rbac_pb2, router_pb2, http_connection_manager_pb2,
          least_request_pb2, ring_hash_pb2, round_robin_pb2, wrr_locality_pb2,
          http_protocol_options_pb2)
