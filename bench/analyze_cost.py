"""What the trained heads cost: Analyze of embed + the four shipped heads against Embed alone.

Both loads run against one running system, on the same texts (the load tester's seeded
generator, same lengths), 32 texts per request, at the same concurrency, in alternating
rounds so that drift on a shared machine falls on both alike. The figure is the ratio of
texts/s (Analyze over Embed); issue 14 asks for at least `ANALYZE_COST_FLOOR`. With a split
encoder, an Analyze text costs one trunk pass and two half-passes (embedding and multi-task
branches); five separate fine-tuned models would cost five full passes (about 0.2x).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from bench.system import load, running_system

ANALYZE_HEADS = ("embed", "sentiment", "intent", "topic", "entities")
TEXTS_PER_REQUEST = 32
CONCURRENCY = 4
LENGTHS = "6,24"  # words: short queries and sentences
ANALYZE_COST_FLOOR = 0.5
HEADING = "## Analyze of five heads against Embed alone"


@dataclass(frozen=True)
class AnalyzeCost:
    """Texts/s of each load summed over its rounds, and their ratio."""

    embed_texts_per_s: float
    analyze_texts_per_s: float
    rounds: int
    duration_s: float

    @property
    def ratio(self) -> float:
        """Analyze texts/s over Embed texts/s."""
        return self.analyze_texts_per_s / self.embed_texts_per_s if self.embed_texts_per_s else 0.0

    def to_dict(self) -> dict[str, object]:
        """results.json's entry."""
        return asdict(self) | {"ratio": round(self.ratio, 3), "floor": ANALYZE_COST_FLOOR}


def _load(target: str, mix: str, duration_s: float, warmup_s: float) -> float:
    report = load(
        target, mix, CONCURRENCY, LENGTHS, duration_s, warmup_s,
        texts_per_request=TEXTS_PER_REQUEST,
    )  # fmt: skip
    return report.texts_per_s


def measure(repo: Path, out: Path, rounds: int, duration_s: float, warmup_s: float) -> AnalyzeCost:
    """Alternate Embed and Analyze loads on one running system."""
    mixes = {"embed": "embed", "analyze": "analyze:" + "+".join(ANALYZE_HEADS)}
    totals = dict.fromkeys(mixes, 0.0)
    with running_system(repo, out / "analyze-cost.log") as (target, _):
        for _ in range(rounds):
            for name, mix in mixes.items():
                totals[name] += _load(target, mix, duration_s, warmup_s)
    return AnalyzeCost(totals["embed"] / rounds, totals["analyze"] / rounds, rounds, duration_s)


def report_lines(cost: AnalyzeCost, provenance: str) -> list[str]:
    """The report section."""
    verdict = "PASS" if cost.ratio >= ANALYZE_COST_FLOOR else "FAIL"
    heads = " + ".join(ANALYZE_HEADS)
    return [
        HEADING,
        "",
        f"{TEXTS_PER_REQUEST} texts per request, concurrency {CONCURRENCY}, lengths {LENGTHS} "
        f"words; {cost.rounds} alternating rounds of {cost.duration_s:g} s each. {provenance}",
        "",
        "| load | texts/s |",
        "|---|---|",
        f"| Embed | {cost.embed_texts_per_s:.1f} |",
        f"| Analyze ({heads}) | {cost.analyze_texts_per_s:.1f} |",
        "",
        f"Ratio Analyze / Embed: **{cost.ratio:.2f}x** (floor {ANALYZE_COST_FLOOR:g}x: {verdict}).",
        "",
    ]
