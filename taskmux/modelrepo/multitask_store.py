"""The committed multi-task branch: where its files are and how its heads are recorded.

`taskmux/modelrepo/trained/multitask/` holds:

- `branch.npz`: the fine-tuned upper layers' parameters (float16), and `branch.json`: the
  branch layer, the recipe and sample sizes of the run, its training time.
- `heads/<name>/{head.json,weights.npz}`: each head trained with the branch, in the form of
  the frozen heads (`build.trained_heads` reads them), with `"features": "multitask"`.

`taskmux model build` serves these heads in place of the frozen heads of the same names
when the branch is there; without it, the frozen heads in `trained/<name>/` are served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.manifest import MULTITASK, HeadSpec
from taskmux.modelrepo.build import TRAINED_HEADS_DIR, trained_heads
from taskmux.modelrepo.headstore import head_record, save_params, trained_head_meta
from taskmux.modelrepo.multitask_data import Task

if TYPE_CHECKING:
    from taskmux.modelrepo.multitask import Recipe
    from taskmux.modelrepo.multitask_refit import Head

MULTITASK_DIR = TRAINED_HEADS_DIR / "multitask"
BRANCH_FILE = "branch.npz"
BRANCH_META = "branch.json"

DESCRIPTIONS = {
    "sentiment": "Binary sentiment (negative/positive) of English text",
    "intent": "Intent of an English assistant query: 150 CLINC150 intents, or 'oos' (out of "
    "scope) when the top probability is below the threshold",
    "topic": "News topic (World, Sports, Business, Sci/Tech) of English text",
    "entities": "Named entities (PER, ORG, LOC, MISC) in English text, IO tags decoded to "
    "code-point spans",
}


def branch_meta(folder: Path = MULTITASK_DIR) -> dict[str, Any] | None:
    """branch.json of the committed branch, or None when there is no branch."""
    meta, weights = folder / BRANCH_META, folder / BRANCH_FILE
    if not (meta.is_file() and weights.is_file()):
        return None
    data: dict[str, Any] = json.loads(meta.read_text(encoding="utf-8"))
    return data


def multitask_heads(folder: Path = MULTITASK_DIR) -> list[tuple[HeadSpec, Path]]:
    """The heads trained with the branch (none when the branch is absent)."""
    if branch_meta(folder) is None:
        return []
    return [(replace(s, features=MULTITASK), w) for s, w in trained_heads(folder / "heads")]


def served_heads(folder: Path = MULTITASK_DIR) -> list[tuple[HeadSpec, Path]]:
    """The trained heads a build serves: multi-task heads replace frozen ones by name."""
    branch = {spec.name: (spec, w) for spec, w in multitask_heads(folder)}
    frozen = [(s, w) for s, w in trained_heads() if s.name not in branch]
    return frozen + list(branch.values())


def write_heads(
    out_dir: Path, tasks: Sequence[Task], heads: Mapping[str, Head], recipe: Recipe
) -> None:
    """Write each task's head folder under `out_dir/heads/` (weights, then head.json)."""
    for task in tasks:
        head = heads[task.name]
        metrics = {k: round(float(v), 4) for k, v in head.validation.metrics.items()}
        metrics["train_examples"] = float(len(task.train))
        form = "an MLP" if "hidden_weight" in head.params else "a linear head"
        form += "" if head.form == "joint" else " (refitted on the branch)"
        description = (
            f"{DESCRIPTIONS.get(task.name, task.name)}: {form} on the multi-task branch "
            f"(all-MiniLM-L6-v2 layers {recipe.branch_layer}+ fine-tuned jointly on "
            "sentiment, intent, topic and entities; `taskmux model train-multitask`, seed "
            f"{recipe.seed}); validation_* figures are on rows held out of training."
        )
        record = head_record(
            task.name, task.kind, task.labels, metrics, description,
            threshold=head.validation.threshold, fallback_label=task.fallback_label,
        )  # fmt: skip
        folder = out_dir / "heads" / task.name
        save_params(folder / "weights.npz", head.params)
        meta = trained_head_meta(record) | {"features": MULTITASK}
        tmp = folder / "head.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "head.json")
