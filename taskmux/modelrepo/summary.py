"""What `taskmux model build` and `model train-defaults` print: a few lines, not the manifest.

A head's line shows its held-out figures from the manifest (`heldout_*` metrics): the rates
as percentages, the counts they were measured on in parentheses, and neither the per-label
breakdowns (`heldout_f1_LOC`) nor the training figures, which `--json` still prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from model.manifest import MANIFEST_FILE, HeadSpec, Manifest
from model.variants import FP16, FP32, INT8, int8_verdict

HELDOUT = "heldout_"
COUNT_SUFFIXES = ("examples", "entities", "sentences")  # heldout_* metrics that are counts


def build_summary(manifest: Manifest, repo: Path, seconds: float | None) -> str:
    """The repository in a few lines; `seconds` None: it was there already, not built."""
    files = [p for p in repo.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    when = "already built (--force rebuilds)" if seconds is None else f"built in {seconds:.0f} s"
    enc = manifest.encoder
    rows = [
        ("model repository", f"{repo} ({megabytes(total)}, {len(files)} files), {when}"),
        ("encoder", f"{enc.name} {enc.version}, dimension {enc.dimension}, "
                    f"up to {enc.max_sequence_length} tokens"),
    ]  # fmt: skip
    rows += [(f"variant {name}", line) for name, line in variant_lines(manifest, repo)]
    rows += [(f"head {h.name}", head_line(h)) for h in manifest.heads]
    rows.append(("manifest", f"{repo / MANIFEST_FILE} (--json prints it)"))
    return format_rows(rows)


def variant_lines(manifest: Manifest, repo: Path) -> list[tuple[str, str]]:
    """(variant, its file, size and when `auto` runs it), fp32 first."""
    enc = manifest.encoder
    files = {FP32: enc.model_file, **{name: v.file for name, v in enc.variants.items()}}
    lines = []
    for name, rel in files.items():
        note = {FP32: "the reference", FP16: "auto runs it on a GPU"}.get(name, "")
        if name == INT8:
            accepted, why = int8_verdict(enc.variants[INT8].metrics)
            note = f"auto runs it on CPU: {why}" if accepted else f"auto keeps fp32: {why}"
        size = megabytes((repo / rel).stat().st_size)
        lines.append((name, f"{rel:<24} {size:>8}  {note}".rstrip()))
    return lines


def head_line(head: HeadSpec) -> str:
    """Kind, label count and held-out figures of one head."""
    line = f"{head.kind}, {len(head.labels)} labels" if head.labels else str(head.kind)
    figures = heldout_figures(head.metrics, head.labels)
    return f"{line}; held-out {figures}" if figures else line


def heldout_figures(metrics: Mapping[str, float], labels: Sequence[str] = ()) -> str:
    """E.g. `f1 80.1%, precision 77.5% (2197 entities)`; empty when there are none."""
    rates, counts = [], []
    for key, value in metrics.items():
        if not key.startswith(HELDOUT):
            continue
        name = key.removeprefix(HELDOUT)
        if name.endswith(COUNT_SUFFIXES):
            counts.append(f"{value:.0f} {name}")
        elif name.rpartition("_")[2] not in labels:
            rates.append(f"{name} {value:.1%}")
    text = ", ".join(rates)
    return f"{text} ({', '.join(counts)})" if counts and text else text


def train_summary(heads: Iterable[HeadSpec], out_dir: Path, seconds: float) -> str:
    """What `train-defaults` wrote: each head's figures, where, and how long it took."""
    rows = [(f"head {h.name}", head_line(h)) for h in heads]
    rows.append(("written to", f"{out_dir}, in {seconds:.0f} s"))
    return format_rows(rows)


def format_rows(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
