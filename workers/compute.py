"""Turning a batch of jobs into replies: one encoder pass, then each job's head.

With a split encoder the pass is the trunk once for every text, then each branch for the
texts whose heads read it (`tasks.branch_rows`).

Runs on a worker thread, never on the event loop. Every job gets exactly one reply,
whatever happens to the others in its batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from taskmux_api.kinds import TaskKind, head_kinds_of
from tokenizers import Encoding

from model.encoder import EncodeStats, l2_normalize
from model.loaded import LoadedModel
from router.messages import ANALYZE_STREAM_HEAD, Job, Reply
from workers.tasks import BatchView, Needs, answer, branch_rows, texts_needed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """The replies of one batch, in job order, and what the encoder did for them."""

    replies: list[Reply]
    encoded: EncodeStats | None
    expired: int
    results: int  # head results delivered (one per text and head)
    encode_s: float = 0.0  # time in the encoder
    heads_s: float = 0.0  # time in the heads
    started_ns: int = 0  # wall clock when the encoder started, for trace spans
    # Per reply: why its job goes to the dead letters ("" for none). A job that decodes
    # but cannot be computed (bad parameters, a head that fails on it) is answered at
    # once and kept there for an operator, never retried.
    problems: tuple[str, ...] = ()


def compute(
    model: LoadedModel,
    jobs: list[Job],
    *,
    max_batch_tokens: int,
    max_batch_rows: int,
    now_ms: int | None = None,
    encodings: Mapping[str, Encoding] | None = None,
    alone: bool = False,
) -> BatchResult:
    """One reply per job. Expired and invalid jobs are answered without the encoder.
    `alone`: nothing else waits for the cores (`Encoder.encode_full`)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    replies: list[Reply | None] = [_refusal(model, job, now) for job in jobs]
    problems = [""] * len(jobs)
    deadline_code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    expired = sum(1 for r in replies if r is not None and r.code == deadline_code)
    needs: dict[int, Needs] = {}
    for i, reply in enumerate(replies):
        if reply is None:
            try:
                needs[i] = texts_needed(model, jobs[i])
            except Exception as err:  # a job's parameters must never fail the batch
                problems[i] = f"parameters cannot be computed: {type(err).__name__}: {err}"
                replies[i] = _error(jobs[i], grpc.StatusCode.INVALID_ARGUMENT, problems[i])
    stats = None
    results = 0
    encode_s = heads_s = 0.0
    started_ns = 0
    if needs:
        # Identical texts are encoded once, whichever jobs and heads they came from.
        unique = list(dict.fromkeys(t for need in needs.values() for t in need.texts))
        row_of = {text: row for row, text in enumerate(unique)}
        start, started_ns = time.perf_counter(), time.time_ns()
        try:
            encoded = model.encoder.encode_full(
                unique,
                max_batch_tokens=max_batch_tokens,
                max_batch_rows=max_batch_rows,
                encodings=encodings,
                branches=branch_rows(needs.values(), row_of),
                alone=alone,
            )
            others = {b: l2_normalize(f.pooled) for b, f in encoded.branches.items()}
            view = BatchView(l2_normalize(encoded.pooled), encoded, row_of, others)
            stats = encoded.stats
        except Exception:
            log.exception("encoder failed on a batch of %d texts", len(unique))
            for i in needs:
                replies[i] = _error(jobs[i], grpc.StatusCode.INTERNAL, "encoder failed")
        else:
            encode_s = time.perf_counter() - start
            for i in needs:
                replies[i], delivered, problems[i] = _answer(model, jobs[i], view)
                results += delivered
            heads_s = time.perf_counter() - start - encode_s
    done = [r for r in replies if r is not None]
    return BatchResult(
        done,
        stats,
        expired,
        results,
        encode_s=encode_s,
        heads_s=heads_s,
        started_ns=started_ns,
        problems=tuple(problems),
    )


def _answer(model: LoadedModel, job: Job, view: BatchView) -> tuple[Reply, int, str]:
    """The job's reply, its head results and, if its head failed on it, why."""
    try:
        body, results = answer(model, job, view)
    except Exception as err:
        log.exception("%s job %s on head %s failed", job.kind, job.id, job.head)
        problem = f"head {job.head!r} failed: {type(err).__name__}"
        return _error(job, grpc.StatusCode.INTERNAL, problem), 0, problem
    return Reply(id=job.id, code=0, body=body), results, ""


def _refusal(model: LoadedModel, job: Job, now_ms: int) -> Reply | None:
    if job.deadline_ms <= now_ms:
        return _error(job, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued")
    names = job.params.get("heads", []) if job.kind == TaskKind.ANALYZE else [job.head]
    if not isinstance(names, list) or not names:
        return _error(job, grpc.StatusCode.INVALID_ARGUMENT, "analyze needs a list of heads")
    for name in names:
        head = model.heads.get(name) if isinstance(name, str) else None
        if head is None or name == ANALYZE_STREAM_HEAD:
            return _error(job, grpc.StatusCode.NOT_FOUND, f"head {name!r} is not served")
        if head.spec.kind not in head_kinds_of(job.kind):
            return _error(
                job,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"head {name!r} is a {head.spec.kind} head; it cannot serve {job.kind}",
            )
    return None


def _error(job: Job, code: grpc.StatusCode, message: str) -> Reply:
    return Reply(id=job.id, code=code.value[0], message=message)
