"""The Prometheus endpoint every process serves, each from its own registry."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


@contextmanager
def metrics_endpoint(addr: str, registry: CollectorRegistry) -> Iterator[int]:
    """Serve `registry` on http://addr/metrics until the block ends; yields the port, or 0
    when `addr` is "" (disabled). Port 0 picks a free one."""
    if not addr:
        yield 0
        return
    host, _, port = addr.rpartition(":")
    # Every interface when the address names none: Prometheus scrapes a pod's IP.
    bind = host.strip("[]") or "0.0.0.0"  # nosec B104
    server, thread = start_http_server(int(port), addr=bind, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on port %d", bound)
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
