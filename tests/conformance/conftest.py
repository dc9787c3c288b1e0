"""Processes shared by the conformance tests: one TestService, one sidecar, a sidecar pair.

Module-scoped: each test module starts its processes once and stops them at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.harness import ManagedProcess, start_sidecar

TEST_ROUTES = {"grpc.testing.TestService": "test", "grpc.testing.UnimplementedService": "test"}


def start_test_server(name: str = "testservice") -> ManagedProcess:
    return ManagedProcess([sys.executable, "-m", "tests.conformance.testservice", "--port", "0"],
                          name)


@pytest.fixture(scope="module")
def test_server() -> Iterator[str]:
    proc = start_test_server()
    try:
        yield proc.addr("server")
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def one_sidecar(test_server: str) -> Iterator[str]:
    """client -> sidecar outbound -> server; yields the outbound address."""
    proc = start_sidecar(service="client", upstreams={"test": [test_server]}, routes=TEST_ROUTES)
    try:
        yield proc.addr("outbound")
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def sidecar_pair(test_server: str) -> Iterator[str]:
    """client -> sidecar A outbound -> sidecar B inbound -> server; yields A's outbound."""
    inbound = start_sidecar(service="test", app=test_server, name="sidecar-test")
    try:
        outbound = start_sidecar(service="client", upstreams={"test": [inbound.addr("inbound")]},
                                 routes=TEST_ROUTES, name="sidecar-client")
        try:
            yield outbound.addr("outbound")
        finally:
            outbound.stop()
    finally:
        inbound.stop()


@pytest.fixture(scope="module")
def paths(test_server: str, one_sidecar: str, sidecar_pair: str) -> dict[str, str]:
    """Path name -> the address a client dials for it."""
    return {"direct": test_server, "one_sidecar": one_sidecar, "sidecar_pair": sidecar_pair}
