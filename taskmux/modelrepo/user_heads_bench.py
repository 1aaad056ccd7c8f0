"""What each `head train` choice gets on a user's file: the README's comparison.

`python -m taskmux.modelrepo.user_heads_bench` (`make bench-user-heads`) takes a seeded
sample of SST-2 `dev.tsv`'s sentence-like rows (rows that neither the shipped heads nor
the multi-task branch were fitted on; the branch did learn sentiment from `train.tsv`, so
the task itself is not new to it) as the user's file, trains the same head three ways
into a hard-linked copy of the repository (the original is never written) and prints each
one's held-out accuracy (the seeded 10% that `head train` holds out) and wall time.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.manifest import EMBEDDING, MULTITASK, load_manifest
from taskmux.modelrepo.custom import train_classification_head
from taskmux.modelrepo.finetune import FineTune
from taskmux.modelrepo.sentiment import read_labelled_tsv

ROWS = 2000
SEED = 0
MIN_WORDS = 8  # sentence-like rows: dev.tsv also holds short phrases, which users rarely send


def sample(data_dir: Path, out: Path, rows: int = ROWS, seed: int = SEED) -> Path:
    """`rows` seeded rows of SST-2 dev.tsv (of MIN_WORDS words or more) as a CSV with `text`
    and `label` columns."""
    rows_read = read_labelled_tsv(data_dir / "sst2" / "dev.tsv")
    texts, labels = rows_read.texts, rows_read.labels
    long = [i for i, text in enumerate(texts) if len(text.split()) >= MIN_WORDS]
    picked = np.random.default_rng(seed).choice(long, size=rows, replace=False)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in sorted(picked.tolist()):
            writer.writerow([texts[i], "positive" if labels[i] == 1 else "negative"])
    return out


def compare(repo: Path, data_dir: Path) -> list[dict[str, Any]]:
    """Train `user-sentiment` three ways on the sample; one row of figures per way."""
    ways: list[tuple[str, dict[str, Any]]] = [
        ("--features embedding", {"features": EMBEDDING}),
        ("--features multitask", {"features": MULTITASK}),
        ("--fine-tune", {"fine_tune": FineTune()}),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="user-heads-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(repo, copy, copy_function=os.link)
        data = sample(data_dir, Path(tmp) / "sst2-sample.csv")
        for flag, options in ways:
            started = time.monotonic()
            report = train_classification_head(copy, data, "user-sentiment", **options)
            results.append({
                "how": flag,
                "features": report["features"],
                "heldout_accuracy": report["metrics"]["heldout_accuracy"],
                "heldout_examples": report["metrics"]["heldout_examples"],
                "seconds": round(time.monotonic() - started, 1),
            })  # fmt: skip
        # Costs from the final manifest: a fine-tune records the layer counts of an older
        # repository's parts, which the first two reports could not give.
        encoder = load_manifest(copy).encoder
        for result in results:
            result["features_cost"] = encoder.branch_cost(result["features"])
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    lines = [
        "| `head train` | reads | its branch's cost (share of a pass) | held-out accuracy "
        "| train time |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['how']}` | {r['features']} | {r['features_cost']:.2f} | "
            f"{100 * r['heldout_accuracy']:.1f}% ({r['heldout_examples']} rows) | "
            f"{r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("model-repo"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    print(table(compare(args.repo, args.data)))


if __name__ == "__main__":
    main()
