"""Ports of a local cluster (`taskmux up`): every process gets its own, picked together so
the kernel cannot hand one out twice (a worker told to listen on another's port fails
at every restart)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from taskmux import local


def test_ports_picked_together_are_different_free_and_avoid_what_is_taken() -> None:
    first = local.free_ports(1)
    ports = local.free_ports(64, avoid=first)
    assert len(set(ports)) == 64 and first[0] not in ports
    for port in ports[:8]:  # free: each can be bound now
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_ports_are_picked_below_the_ephemeral_range() -> None:
    # Outgoing connections take their local ports from that range, so a port picked there
    # can be taken before its listener binds it.
    low, _ = map(int, local.EPHEMERAL_RANGE.read_text().split())
    assert low > local.LISTEN_PORTS_FROM
    ports = local.free_ports(64)
    assert all(local.LISTEN_PORTS_FROM <= p < low for p in ports)


def test_without_a_known_ephemeral_range_the_kernel_picks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(local, "EPHEMERAL_RANGE", tmp_path / "absent")
    assert list(local.listen_port_candidates()) == []
    ports = local.free_ports(4)
    assert len(set(ports)) == 4 and all(p > 0 for p in ports)


def test_a_taken_candidate_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        monkeypatch.setattr(local, "listen_port_candidates", lambda: iter([busy]))
        (port,) = local.free_ports(1)
    assert port != busy


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
