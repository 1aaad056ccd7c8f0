"""The shipped heads: the data files each is trained on, and the function that trains it.

`taskmux model train-defaults` trains them on the packaged encoder into `trained/`; a build
from another encoder (`own_encoder.py`) trains them on that encoder into its repository.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from taskmux.modelrepo import entities_head, intent, topic
from taskmux.modelrepo.entities_head import train_entities
from taskmux.modelrepo.intent import INTENT
from taskmux.modelrepo.recipe import train_shipped
from taskmux.modelrepo.sentiment import SENTIMENT
from taskmux.modelrepo.topic import TOPIC

SHIPPED_HEADS = ("sentiment", "intent", "topic", "entities")
# Each head's files under the data folder (the layout of ../shared/data).
DATA_FILES = {
    "sentiment": (Path("sst2") / "train.tsv", Path("sst2") / "dev.tsv"),
    "intent": (intent.DATA_FILE,),
    "topic": (topic.DATA_FILE,),
    "entities": (entities_head.DATA_FILE,),
}

# (repo, data_dir, *, out_dir=..., cache_dir=...) -> the head's report
Trainer = Callable[..., dict[str, Any]]
TRAINERS: dict[str, Trainer] = {
    "sentiment": partial(train_shipped, SENTIMENT),
    "intent": partial(train_shipped, INTENT),
    "topic": partial(train_shipped, TOPIC),
    "entities": train_entities,
}


def missing_data(data_dir: Path, heads: tuple[str, ...] = SHIPPED_HEADS) -> list[Path]:
    """The data files `heads` are trained on that `data_dir` lacks."""
    return [f for name in heads for f in DATA_FILES[name] if not (data_dir / f).is_file()]
