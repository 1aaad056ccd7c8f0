"""Encoder throughput per variant, side by side: `taskmux model bench-variants`.

Every variant runs the same texts (held-out texts of 8 to 128 word pieces) in batches of
the same size with the same thread count, taking turns batch by batch, so a neighbour's
load on a shared machine hits all of them alike. The figure is the median over rounds.
This is a measurement for people; no test depends on it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model.encoder import Encoder
from model.manifest import load_manifest
from taskmux.modelrepo.variant_eval import agreement_texts

MIN_TOKENS, MAX_TOKENS = 8, 128  # word pieces, [CLS] and [SEP] included


@dataclass(frozen=True)
class Throughput:
    """Texts per second of one variant: the median and every round."""

    variant: str
    texts_per_s: float
    rounds: list[float]


@dataclass(frozen=True)
class Bench:
    """One side-by-side run."""

    results: list[Throughput]  # in the order asked for; the first is the baseline
    texts: int
    tokens: tuple[int, int]  # shortest and longest allowed, in word pieces
    mean_tokens: float
    batch_size: int
    threads: int


def bench_texts(
    encoder: Encoder,
    data_dir: Path,
    *,
    tokens: tuple[int, int] = (MIN_TOKENS, MAX_TOKENS),
    count: int = 512,
    seed: int = 0,
) -> list[str]:
    """`count` held-out texts whose length in word pieces is within `tokens`, shuffled
    reproducibly; the mix of lengths is the data sets' own."""
    pool = agreement_texts(data_dir, per_set=1000)
    low, high = tokens
    ok = [t for t in pool if low <= len(encoder.tokenizer.encode(t).ids) <= high]
    random.Random(seed).shuffle(ok)
    return ok[:count]


def measure(
    repo: Path,
    data_dir: Path,
    variants: Sequence[str],
    *,
    batch_size: int = 32,
    threads: int = 0,
    rounds: int = 5,
    tokens: tuple[int, int] = (MIN_TOKENS, MAX_TOKENS),
) -> Bench:
    """Texts/s of each variant on CPU, at `batch_size` texts per encoder call."""
    spec = load_manifest(repo).encoder
    encoders = {
        name: Encoder(
            repo,
            spec,
            providers=["CPUExecutionProvider"],
            intra_op_threads=threads,
            variant=name,
        )
        for name in variants
    }
    texts = bench_texts(next(iter(encoders.values())), data_dir, tokens=tokens)
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    for encoder in encoders.values():  # warm-up: first runs allocate and pick kernels
        encoder.encode(batches[0])
    seen: dict[str, list[float]] = {name: [] for name in variants}
    names = list(encoders)
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for i, batch in enumerate(batches):
            # Variants take turns batch by batch, in rotating order, so that load from
            # other processes lands on all of them alike.
            for name in names[i % len(names) :] + names[: i % len(names)]:
                started = time.perf_counter()
                encoders[name].encode(batch)
                spent[name] += time.perf_counter() - started
        for name in names:
            seen[name].append(len(texts) / spent[name])
    tokenizer = next(iter(encoders.values())).tokenizer
    mean_tokens = statistics.mean(len(e.ids) for e in tokenizer.encode_batch(texts))
    results = [Throughput(n, statistics.median(r), r) for n, r in seen.items()]
    return Bench(results, len(texts), tokens, mean_tokens, batch_size, threads)


def format_bench(bench: Bench) -> str:
    """One line per variant, and each one's speed relative to the first (fp32)."""
    results = bench.results
    base = results[0].texts_per_s
    lines = [
        f"{bench.texts} texts ({bench.tokens[0]}-{bench.tokens[1]} word pieces, mean "
        f"{bench.mean_tokens:.1f}), batch {bench.batch_size}, threads "
        f"{bench.threads or 'ORT default'}; median of {len(results[0].rounds)} rounds:"
    ]
    for r in results:
        spread = f"{min(r.rounds):.0f}-{max(r.rounds):.0f}"
        lines.append(
            f"  {r.variant:5} {r.texts_per_s:8.1f} texts/s  (rounds {spread})  "
            f"x{r.texts_per_s / base:.2f} vs {results[0].variant}"
        )
    return "\n".join(lines)
