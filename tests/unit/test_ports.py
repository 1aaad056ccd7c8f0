"""Ports of a local cluster (`taskmux up`): every process gets its own, picked together so
the kernel cannot hand one out twice (a worker told to listen on another's port fails
at every restart)."""

from __future__ import annotations

import socket

import pytest

from taskmux import local


def test_ports_picked_together_are_different_free_and_avoid_what_is_taken() -> None:
    first = local.free_ports(1)
    ports = local.free_ports(64, avoid=first)
    assert len(set(ports)) == 64 and first[0] not in ports
    for port in ports[:8]:  # free: each can be bound now
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("balances", [True, False])
def test_a_layout_gives_every_listener_its_own_port_but_the_shared_ones(
    monkeypatch: pytest.MonkeyPatch, balances: bool
) -> None:
    monkeypatch.setattr(local, "reuse_port_balances", lambda: balances)
    layout = local.plan_layout(50051, gateways=3, workers=4, http_port=8080)
    listeners = [
        *set(layout.gateway_ports),
        *set(layout.gateway_http_ports),
        *layout.gateway_metrics_ports,
        *layout.worker_health_ports,
        *layout.worker_metrics_ports,
    ]
    assert len(listeners) == len(set(listeners)) == len(layout.ports())
    assert len(listeners) == (2 if balances else 6) + 3 + 4 + 4
