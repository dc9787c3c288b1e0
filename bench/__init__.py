"""The benchmark harness (`make bench`): what a hop through the sidecar costs, next to nginx."""
