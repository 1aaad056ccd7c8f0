"""What the static int8 encoder's activation ranges are fitted on: training texts of the
four shipped tasks, never their held-out rows.

Static quantisation fixes every activation scale at build time, which is what makes a
text's int8 vector the same alone or in any batch (dynamic quantisation computed one scale
per call over the whole batch, padding included). The scales are only as good as the texts
they are fitted on, so these come from every task the encoder serves: SST-2 phrases and
sentences, CLINC150 queries, AG News articles and CoNLL-2003 sentences, a seeded sample of
each head's inner fit rows (`multitask_data.load_tasks`, the heads' own splits).

Each text is one feed, unpadded: padding positions never reach a range.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.parts import Feeds

TEXTS_PER_TASK = 64
CALIBRATION_SEED = 0
MAX_TOKENS = 256  # the serving truncation (build.MAX_SEQUENCE_LENGTH)


class CalibrationError(RuntimeError):
    """The int8 encoder cannot be calibrated (the training data is not there)."""


@functools.cache
def calibration_texts(
    data_dir: Path, tokenizer_file: Path, per_task: int = TEXTS_PER_TASK
) -> tuple[str, ...]:
    """`per_task` distinct training texts of each shipped task, sampled with a fixed seed."""
    from taskmux.modelrepo.multitask_data import Sizes, load_tasks

    if not data_dir.is_dir():
        raise CalibrationError(
            f"int8 is calibrated on the shipped training data and {data_dir} does not exist: "
            "pass --data DIR (the folder of sst2/, clinc150/, agnews/, conll2003/), "
            "or build without int8 (--variants fp16)"
        )
    # Only the training rows are wanted; no borrowed or repeated intent rows.
    sizes = Sizes(oos_borrowed=0, oos_repeat=1)
    tasks = load_tasks(data_dir, CALIBRATION_SEED, sizes, tokenizer_file)
    rng = np.random.default_rng(CALIBRATION_SEED)
    texts: list[str] = []
    for task in tasks:
        distinct = sorted(set(task.train.texts))
        picked = rng.choice(len(distinct), size=min(per_task, len(distinct)), replace=False)
        texts += [distinct[i] for i in sorted(picked)]
    return tuple(texts)


def token_feeds(
    tokenizer_file: Path, texts: Sequence[str], max_tokens: int = MAX_TOKENS
) -> list[Feeds]:
    """The encoder's (and the trunk's) inputs, one unpadded text per feed, cut at
    `max_tokens` as serving cuts them."""
    from taskmux.modelrepo.multitask_data import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file, max_tokens)
    feeds = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids = np.asarray([encoding.ids], dtype=np.int64)
        feeds.append(
            {
                "input_ids": ids,
                "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),
                "token_type_ids": np.zeros_like(ids),
            }
        )
    return feeds


def branch_feeds(trunk_file: Path, feeds: Sequence[Feeds]) -> list[Feeds]:
    """A branch's inputs for the same texts: the fp32 trunk's hidden states and the mask."""
    import onnxruntime as ort

    trunk = ort.InferenceSession(str(trunk_file), providers=["CPUExecutionProvider"])
    names = [i.name for i in trunk.get_inputs()]
    out: list[Feeds] = []
    for feed in feeds:
        hidden: npt.NDArray[Any] = trunk.run(["hidden"], {n: feed[n] for n in names})[0]
        out.append({"hidden": hidden, "attention_mask": feed["attention_mask"]})
    return out


def feed_reader(feeds: Sequence[Feeds]) -> Any:
    """The feeds as onnxruntime's CalibrationDataReader."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._feeds: Iterator[Feeds] = iter(feeds)

        def get_next(self) -> Feeds | None:
            return next(self._feeds, None)

    return Reader()
