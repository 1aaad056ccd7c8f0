"""Turning a batch of jobs into replies: one encoder pass, then each job's head.

Runs on a worker thread, never on the event loop. Every job gets exactly one reply,
whatever happens to the others in its batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np

from router.messages import KIND_CLASSIFY, KIND_EMBED, Job, Reply
from taskmux.modelrepo.manifest import KIND_CLASSIFICATION, KIND_EMBEDDING
from taskmux.v1 import taskmux_pb2 as pb
from workers.encoder import EncodeStats, Floats, l2_normalize
from workers.model import LoadedModel

log = logging.getLogger(__name__)

KIND_OF_JOB = {KIND_EMBED: KIND_EMBEDDING, KIND_CLASSIFY: KIND_CLASSIFICATION}


@dataclass(frozen=True)
class BatchResult:
    """The replies of one batch, in job order, and what the encoder did for them."""

    replies: list[Reply]
    encoded: EncodeStats | None
    expired: int


def compute(
    model: LoadedModel,
    jobs: list[Job],
    *,
    max_batch_tokens: int,
    max_batch_rows: int,
    now_ms: int | None = None,
) -> BatchResult:
    """One reply per job. Expired jobs are answered without running the encoder."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    replies: list[Reply | None] = [None] * len(jobs)
    live: list[int] = []
    for i, job in enumerate(jobs):
        problem = _refusal(model, job, now)
        if problem is not None:
            replies[i] = problem
        else:
            live.append(i)
    expired = sum(1 for r in replies if r and r.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    stats = None
    if live:
        # Identical texts are encoded once, whichever jobs and heads they came from.
        unique = list(dict.fromkeys(t for i in live for t in jobs[i].texts))
        row_of = {text: row for row, text in enumerate(unique)}
        try:
            pooled, stats = model.encoder.encode(
                unique, max_batch_tokens=max_batch_tokens, max_batch_rows=max_batch_rows
            )
            vectors = l2_normalize(pooled)
        except Exception:
            log.exception("encoder failed on a batch of %d texts", len(unique))
            for i in live:
                replies[i] = _error(jobs[i], grpc.StatusCode.INTERNAL, "encoder failed")
            vectors = None
        if vectors is not None:
            for i in live:
                rows = vectors[[row_of[t] for t in jobs[i].texts]]
                replies[i] = _answer(model, jobs[i], rows)
    return BatchResult([r for r in replies if r is not None], stats, expired)


def _refusal(model: LoadedModel, job: Job, now_ms: int) -> Reply | None:
    if job.deadline_ms <= now_ms:
        return _error(job, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued")
    head = model.heads.get(job.head)
    if head is None:
        return _error(job, grpc.StatusCode.NOT_FOUND, f"head {job.head!r} is not served")
    if head.spec.kind != KIND_OF_JOB[job.kind]:
        return _error(
            job,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"head {job.head!r} is a {head.spec.kind} head; it cannot serve {job.kind}",
        )
    return None


def _answer(model: LoadedModel, job: Job, vectors: Floats) -> Reply:
    """The job's response message; a head failure fails this job only."""
    head = model.heads[job.head]
    encoder = model.manifest.encoder
    try:
        outputs = head.apply(vectors)
        if outputs.shape[0] != len(job.texts):
            raise RuntimeError(f"head returned {outputs.shape[0]} rows for {len(job.texts)}")
        body: pb.EmbedResponse | pb.ClassifyResponse
        if job.kind == KIND_EMBED:
            body = pb.EmbedResponse(
                embeddings=[pb.Embedding(values=row.tolist()) for row in outputs],
                model=encoder.name,
                model_version=encoder.version,
            )
        else:
            body = pb.ClassifyResponse(
                results=[_classification(head.spec.labels, row, job.top_k) for row in outputs],
                model=encoder.name,
                model_version=encoder.version,
                head=head.spec.name,
                head_version=head.spec.version,
            )
    except Exception:
        log.exception("head %s failed on job %s", job.head, job.id)
        return _error(job, grpc.StatusCode.INTERNAL, f"head {job.head!r} failed")
    return Reply(id=job.id, code=0, body=body.SerializeToString())


def _classification(labels: tuple[str, ...], probs: Floats, top_k: int) -> pb.ClassificationResult:
    best = np.argsort(-probs, kind="stable")[: max(1, min(top_k, len(labels)))]
    top = [pb.LabelScore(label=labels[j], score=float(probs[j])) for j in best]
    return pb.ClassificationResult(label=top[0].label, score=top[0].score, top=top)


def _error(job: Job, code: grpc.StatusCode, message: str) -> Reply:
    return Reply(id=job.id, code=code.value[0], message=message)
