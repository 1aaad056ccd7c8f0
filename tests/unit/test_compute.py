"""The worker's batch computation on the real ONNX model, without Redis."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from taskmux_api.v1 import taskmux_pb2 as pb

from model.heads import TokenClassifierHead
from model.loaded import LoadedModel
from router.messages import Job
from workers.compute import compute
from workers.settings import WorkerSettings


@pytest.fixture(scope="module")
def model(model_repo: Path) -> LoadedModel:
    return LoadedModel.load(WorkerSettings(model_repo=model_repo))


def _job(texts: list[str], head: str = "embed", kind: str = "embed", **kw: int) -> Job:
    deadline = kw.pop("deadline_ms", int(time.time() * 1000) + 60_000)
    return Job(
        id=f"{head}-{len(texts)}-{deadline}",
        reply_to="r",
        deadline_ms=deadline,
        kind=kind,
        head=head,
        texts=tuple(texts),
        **kw,
    )


def test_identical_texts_are_encoded_once(model: LoadedModel) -> None:
    jobs = [_job(["same", "other"]), _job(["same"]), _job(["other", "same", "third"])]
    result = compute(model, jobs, max_batch_tokens=4096, max_batch_rows=64)
    assert result.encoded is not None
    assert result.encoded.rows == 3  # distinct texts
    assert sum(len(j.texts) for j in jobs) == 6  # results delivered
    assert [r.code for r in result.replies] == [0, 0, 0]
    first = pb.EmbedResponse.FromString(result.replies[0].body).embeddings[0].values
    again = pb.EmbedResponse.FromString(result.replies[1].body).embeddings[0].values
    assert np.allclose(first, again)


def test_each_job_gets_its_own_refusal(model: LoadedModel) -> None:
    jobs = [
        _job(["late"], deadline_ms=int(time.time() * 1000) - 1),
        _job(["x"], head="missing", kind="classify", top_k=1),
        _job(["x"], head="embed", kind="classify", top_k=1),
        _job(["fine"]),
    ]
    result = compute(model, jobs, max_batch_tokens=4096, max_batch_rows=64)
    codes = [r.code for r in result.replies]
    assert codes == [
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        0,
    ]
    assert result.expired == 1
    assert result.encoded is not None and result.encoded.rows == 1


def test_expired_batch_never_runs_the_encoder(model: LoadedModel) -> None:
    result = compute(
        model, [_job(["late"], deadline_ms=1)], max_batch_tokens=4096, max_batch_rows=8
    )
    assert result.encoded is None
    assert result.expired == 1


def test_batches_respect_the_token_budget(model: LoadedModel) -> None:
    texts = [f"text number {i} " * (i % 7 + 1) for i in range(40)]
    pooled, stats = model.encoder.encode(texts, max_batch_tokens=120, max_batch_rows=64)
    assert stats.padded_tokens <= stats.batches * 120
    assert stats.batches > 1
    assert stats.padded_tokens >= stats.real_tokens
    whole, _ = model.encoder.encode(texts, max_batch_tokens=100_000, max_batch_rows=1000)
    assert np.allclose(pooled, whole, atol=1e-4)


def test_rejection_threshold_answers_the_fallback_label() -> None:
    from model.manifest import HeadSpec
    from workers.tasks import classification

    spec = HeadSpec(
        "intent",
        "classification",
        "1",
        ("balance", "transfer", "oos"),
        "w",
        threshold=0.5,
        fallback_label="oos",
    )
    sure = classification(spec, np.array([0.8, 0.15, 0.05], np.float32), 2)
    assert (sure.label, [t.label for t in sure.top]) == ("balance", ["balance", "transfer"])
    unsure = classification(spec, np.array([0.4, 0.35, 0.25], np.float32), 1)
    assert unsure.label == "oos" and unsure.score == pytest.approx(0.25)
    assert unsure.top[0].label == "balance"  # the ranking is still reported


def test_a_token_head_applied_to_many_texts_finds_what_it_finds_in_each(
    model: LoadedModel,
) -> None:
    head = model.heads["entities"]
    assert isinstance(head, TokenClassifierHead)
    texts = [
        "Angela Merkel met Emmanuel Macron in Paris on Monday.",
        "no names here at all",
        "Apple opened an office in Berlin, said Tim Cook.",
    ]
    encoded = model.encoder.encode_tokens(texts, branch=head.spec.features)
    together = head.entities_of([(s, e, t) for (s, e), t in zip(encoded, texts, strict=True)])
    alone = [head.entities(s, e, t) for (s, e), t in zip(encoded, texts, strict=True)]
    assert [[(s.label, s.start, s.end) for s in spans] for spans in together] == [
        [(s.label, s.start, s.end) for s in spans] for spans in alone
    ]
    assert any(together), "no entity found: the comparison would prove nothing"
    scores = [s.score for spans in together for s in spans]
    assert np.allclose(scores, [s.score for spans in alone for s in spans], atol=1e-5)
