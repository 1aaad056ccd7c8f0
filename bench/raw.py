"""The in-process baselines: raw ONNX Runtime, and one separate encoder per task.

Both use the worker's own `Encoder` (tokenizer + ONNX Runtime session, same model file,
precision and threads), so the only difference from the full system is everything
taskmux adds around it: gRPC, Redis, batching across requests, and the reply path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import cycle

from model.encoder import Encoder, l2_normalize
from model.heads import Head, LinearClassifierHead, TokenClassifierHead


@dataclass(frozen=True)
class RawResult:
    """What raw ONNX Runtime achieves on this machine."""

    batch1_p50_ms: float
    batch1_p99_ms: float
    throughput_by_batch: dict[int, float]  # texts/s per batch size

    @property
    def best_batch(self) -> int:
        return max(self.throughput_by_batch, key=self.throughput_by_batch.__getitem__)

    @property
    def best_throughput(self) -> float:
        return self.throughput_by_batch[self.best_batch]


def measure_raw(
    encoder: Encoder, texts: Sequence[str], batch_sizes: Sequence[int], duration_s: float
) -> RawResult:
    """Batch-1 latency, then throughput at each batch size, each for `duration_s`."""
    latencies = []
    deadline = time.perf_counter() + duration_s
    for text in cycle(texts):
        started = time.perf_counter()
        encoder.encode([text])
        latencies.append((time.perf_counter() - started) * 1000)
        if time.perf_counter() > deadline:
            break
    throughput = measure_throughput(encoder, texts, batch_sizes, duration_s)
    cuts = statistics.quantiles(latencies, n=100)
    return RawResult(statistics.median(latencies), cuts[98], throughput)


def measure_throughput(
    encoder: Encoder, texts: Sequence[str], batch_sizes: Sequence[int], duration_s: float
) -> dict[int, float]:
    """Texts/s at each batch size, each for `duration_s`."""
    return {b: _throughput(encoder, texts, b, duration_s) for b in batch_sizes}


def best_of(results: Sequence[RawResult]) -> RawResult:
    """The best figure of each cell over runs with different session settings (spinning
    threads or not): the baseline taskmux is held to is raw ONNX Runtime at its best."""
    best = min(results, key=lambda r: r.batch1_p50_ms)
    batches = results[0].throughput_by_batch
    throughput = {b: max(r.throughput_by_batch[b] for r in results) for b in batches}
    return RawResult(best.batch1_p50_ms, best.batch1_p99_ms, throughput)


def _throughput(encoder: Encoder, texts: Sequence[str], batch: int, duration_s: float) -> float:
    encoder.encode(list(texts[:batch]))  # warm-up at this shape
    done = 0
    started = time.perf_counter()
    offset = 0
    while time.perf_counter() - started < duration_s:
        chunk = [texts[(offset + i) % len(texts)] for i in range(batch)]
        offset += batch
        encoder.encode(chunk, max_batch_rows=batch, max_batch_tokens=batch * 512)
        done += batch
    return done / (time.perf_counter() - started)


def measure_separate_encoders(
    encoders: Sequence[Encoder],
    heads: Sequence[Head],
    texts: Sequence[str],
    batch: int,
    duration_s: float,
) -> float:
    """Texts/s when each task has its own encoder (today's alternative) at `batch`.

    Every text goes through every encoder, then that encoder's head, as four separate
    single-task services would do.
    """
    done = 0
    offset = 0
    started = time.perf_counter()
    while time.perf_counter() - started < duration_s:
        chunk = [texts[(offset + i) % len(texts)] for i in range(batch)]
        offset += batch
        for encoder, head in zip(encoders, heads, strict=True):
            if isinstance(head, TokenClassifierHead):
                for text, (states, encoding) in zip(
                    chunk, encoder.encode_tokens(chunk), strict=True
                ):
                    head.entities(states, encoding, text)
                continue
            pooled, _ = encoder.encode(chunk, max_batch_rows=batch, max_batch_tokens=batch * 512)
            vectors = l2_normalize(pooled)
            if isinstance(head, LinearClassifierHead):
                head.apply(vectors)
        done += batch
    return done / (time.perf_counter() - started)
