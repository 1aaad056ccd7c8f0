"""The bench's peers (bench/plain_server.py) answer Embed over real gRPC: the plain server
with the encoder's normalised vectors, the echo server (`--echo`) with one fixed unit
vector per text and no encoder. No timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client.channel import open_channel

from bench.peers import plain_server
from model.manifest import load_manifest

TEXTS = ["a cat sat on the mat", "stock markets fell sharply today", "hi"]


def _embed(target: str) -> np.ndarray:
    with open_channel(target, None, ()) as channel:
        reply = taskmux_pb2_grpc.TaskMuxStub(channel).Embed(
            pb.EmbedRequest(texts=TEXTS), timeout=30
        )
    return np.asarray([e.values for e in reply.embeddings])


@pytest.mark.integration
@pytest.mark.parametrize("echo", [False, True])
def test_each_peer_answers_one_unit_vector_per_text(
    model_repo: Path, tmp_path: Path, echo: bool
) -> None:
    dimension = load_manifest(model_repo, verify=False).encoder.dimension
    with plain_server(model_repo, tmp_path / "server.log", echo=echo) as (target, pid):
        vectors = _embed(target)
    assert pid > 0
    assert vectors.shape == (len(TEXTS), dimension)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-5)
    distinct = len({v.tobytes() for v in vectors})
    # The encoder tells different texts apart; the echo server answers without reading them.
    assert distinct == (1 if echo else len(TEXTS))
