"""The model card's training command names every recipe setting off its default, so the
committed branch can be retrained from the card alone."""

from __future__ import annotations

from typing import Any

from model.manifest import EncoderSpec, Manifest
from taskmux.modelrepo.multitask_card import _how

ENCODER = EncoderSpec(
    "all-MiniLM-L6-v2", "1", 384, 256, "encoder/model.onnx", "tok.json", branch_layer=2
)


def _command(recipe: dict[str, Any], oos_borrowed: int = 300) -> str:
    manifest = Manifest(encoder=ENCODER, heads=())
    meta = {"recipe": {"epochs": 2, **recipe}, "sizes": {"oos_borrowed": oos_borrowed}}
    line = next(line for line in _how(manifest, meta) if "Trained by" in line)
    return line.split("`")[1]


def test_a_default_recipe_names_only_what_every_run_gives() -> None:
    assert _command({}) == (
        "taskmux model train-multitask --epochs 2 --branch-layer 2 --oos-borrowed 300"
    )


def test_settings_off_their_defaults_are_named() -> None:
    recipe = {"topic_passes": 2, "entities_passes": 3, "epoch_choice": "written", "ema": 0.999}
    command = _command(recipe, oos_borrowed=0)
    assert command.endswith(
        "--branch-layer 2 --topic-passes 2 --entities-passes 3 --epoch-choice written --ema 0.999"
    )
