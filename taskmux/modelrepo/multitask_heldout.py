"""Held-out figures of the heads written by `train-multitask`, recorded in their head.json.

The held-out rows are the frozen heads' (`sentiment_heldout`, `intent_heldout`,
`topic_heldout`, `entities_heldout`, all at `SPLIT_SEED`), read only here, after every
choice was made; texts are tokenized as a worker tokenizes them (up to 256 word pieces) and
scored with the serving arithmetic. `taskmux model eval` recomputes the same figures
through the ONNX graphs and shows these beside them (RECORDED).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.encoder import l2_normalize
from model.heads import load_mlp
from model.manifest import HeadSpec
from taskmux.modelrepo.build import MAX_SEQUENCE_LENGTH, source_model_dir, trained_heads
from taskmux.modelrepo.datasets import LabelledRows
from taskmux.modelrepo.entities_head import entities_heldout
from taskmux.modelrepo.entities_train import score_entities
from taskmux.modelrepo.fit import Params
from taskmux.modelrepo.intent import intent_heldout, intent_scores
from taskmux.modelrepo.multitask_data import TaskRows, load_tokenizer
from taskmux.modelrepo.multitask_eval import branch_outputs
from taskmux.modelrepo.recipe import class_probs, hit_rate, served_labels
from taskmux.modelrepo.sentiment import sentiment_heldout
from taskmux.modelrepo.topic import topic_heldout

if TYPE_CHECKING:
    from taskmux.modelrepo.multitask import Net

Scorer = Callable[[Any, HeadSpec, Params, Path, Callable[[list[str]], TaskRows]], dict[str, float]]


def _accuracy(
    net: Any, spec: HeadSpec, params: Params, rows: LabelledRows, encode: Any
) -> dict[str, float]:
    pooled, _ = branch_outputs(net, encode(rows.texts))
    answers = served_labels(class_probs(l2_normalize(pooled), params), spec.labels)
    return {"heldout_accuracy": hit_rate(answers, rows.labels), "heldout_examples": len(rows.texts)}


def _sentiment(
    net: Any, spec: HeadSpec, params: Params, data: Path, encode: Any
) -> dict[str, float]:
    return _accuracy(net, spec, params, sentiment_heldout(data), encode)


def _topic(net: Any, spec: HeadSpec, params: Params, data: Path, encode: Any) -> dict[str, float]:
    return _accuracy(net, spec, params, topic_heldout(data), encode)


def _intent(net: Any, spec: HeadSpec, params: Params, data: Path, encode: Any) -> dict[str, float]:
    inscope, oos = intent_heldout(data)
    x_in = l2_normalize(branch_outputs(net, encode(inscope.texts))[0])
    x_oos = l2_normalize(branch_outputs(net, encode(oos.texts))[0])
    scores = intent_scores(params, spec.labels, spec.threshold, x_in, inscope.labels, x_oos)
    return {f"heldout_{k}": v for k, v in scores.items()} | {
        "heldout_inscope_examples": len(inscope.texts),
        "heldout_oos_examples": len(oos.texts),
    }


def _entities(
    net: Any, spec: HeadSpec, params: Params, data: Path, encode: Any
) -> dict[str, float]:
    sentences = entities_heldout(data)
    rows = encode([s.text for s in sentences])
    _, states = branch_outputs(net, rows)
    scores = score_entities(
        sentences, list(zip(states, rows.encodings, strict=True)), params, spec.labels
    )
    return {
        "heldout_f1": scores.f1,
        "heldout_precision": scores.precision,
        "heldout_recall": scores.recall,
        "heldout_entities": scores.gold,
    }


SCORERS: dict[str, Scorer] = {
    "sentiment": _sentiment,
    "intent": _intent,
    "topic": _topic,
    "entities": _entities,
}


def record_heldout(
    net: Net, out_dir: Path, data_dir: Path, emit: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Score each written head of `out_dir/heads` on its held-out rows (the branch of
    `net`) and add the figures to its head.json."""
    tokenizer = load_tokenizer(source_model_dir() / "tokenizer.json", MAX_SEQUENCE_LENGTH)

    def encode(texts: list[str]) -> TaskRows:
        return TaskRows(tokenizer.encode_batch(texts), [0] * len(texts), texts)

    figures = {}
    for spec, weights in trained_heads(out_dir / "heads"):
        params = load_mlp(weights.parent, _relative(spec), net.dim)
        found = {
            k: round(float(v), 4)
            for k, v in SCORERS[spec.name](net, spec, params, data_dir, encode).items()
        }
        emit(f"held-out {spec.name}: " + " ".join(f"{k}={v}" for k, v in found.items()))
        meta_file = weights.parent / "head.json"
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        meta["metrics"] = {**found, **meta["metrics"]}
        tmp = meta_file.with_name("head.json.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, meta_file)
        figures[spec.name] = found
    return figures


def _relative(spec: HeadSpec) -> HeadSpec:
    return replace(spec, weights_file="weights.npz")
