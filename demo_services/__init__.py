"""The demo shop: gRPC services that call each other only through their sidecars.

`python -m demo_services.run` (what `make demo` runs) starts every instance, one sidecar per
instance, and a load generator; see run.py.
"""
