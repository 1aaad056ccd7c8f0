"""Running an encoder cut in parts: the trunk once per batch, then each branch on the rows
that need it.

A repository built with a multi-task branch (manifest schema 2, `EncoderSpec.parts`) has
three graphs: `trunk` (input_ids, attention_mask, token_type_ids -> hidden), and two
branches (hidden, attention_mask -> token_embeddings, pooled): `embedding`, the original
upper layers (trunk + embedding is the original encoder), and `multitask`. A branch runs on
the sub-batch of rows that asked for it, cut to that sub-batch's longest row, so a batch of
embed requests costs one trunk and one embedding half-pass, and a text that only
classification heads read skips the embedding branch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding

from model.manifest import TRUNK as TRUNK  # re-exported: the part every branch reads

Feeds = dict[str, npt.NDArray[Any]]
# (session, feeds, output names) -> outputs: plain `run`, or through an I/O binding.
Runner = Callable[[ort.InferenceSession, Feeds, list[str]], list[npt.NDArray[np.float32]]]


@dataclass(frozen=True)
class Want:
    """Rows of a batch (positions) that need a branch, and whether token states too."""

    rows: list[int]
    tokens: bool


@dataclass(frozen=True)
class BranchOutput:
    """A branch's outputs for `rows` of the batch: pooled [rows, dim], states or None."""

    rows: list[int]
    pooled: npt.NDArray[np.float32]
    states: npt.NDArray[np.float32] | None


@dataclass(frozen=True)
class Features:
    """One branch's outputs; rows it was not asked for are zero vectors and absent states."""

    pooled: npt.NDArray[np.float32]  # [texts, dim] mean-pooled, not normalised
    token_states: dict[
        int, npt.NDArray[np.float32]
    ]  # [tokens, dim] per row asked for, incl. [CLS]/[SEP]


class Collector:
    """One branch's outputs gathered from the batches of a pass, in input order."""

    def __init__(self, texts: int, dimension: int) -> None:
        self.pooled = np.zeros((texts, dimension), dtype=np.float32)
        self.states: dict[int, npt.NDArray[np.float32]] = {}

    def add(
        self, chunk: list[int], out: BranchOutput, token_rows: set[int], tokens: list[Encoding]
    ) -> None:
        """Put one batch's outputs at their texts' rows (`chunk`: the batch's text rows)."""
        texts = [chunk[k] for k in out.rows]
        self.pooled[texts] = out.pooled
        if out.states is not None:
            for row, i in enumerate(texts):
                if i in token_rows:
                    self.states[i] = out.states[row, : len(tokens[i].ids)].copy()

    def features(self) -> Features:
        """What was gathered."""
        return Features(self.pooled, self.states)


class BranchSessions:
    """The trunk and branch sessions of one encoder variant."""

    def __init__(
        self, trunk: ort.InferenceSession, branches: Mapping[str, ort.InferenceSession]
    ) -> None:
        self.trunk = trunk
        self.branches = dict(branches)

    def run(
        self, feeds: Feeds, lengths: Sequence[int], wants: Mapping[str, Want], runner: Runner
    ) -> dict[str, BranchOutput]:
        """Each wanted branch's outputs for its rows; the trunk runs once for the batch."""
        wanted = {name: want for name, want in wants.items() if want.rows}
        unknown = wanted.keys() - self.branches.keys()
        if unknown:
            raise KeyError(f"the encoder has no {sorted(unknown)} branch")
        if not wanted:
            return {}
        trunk_feeds = {i.name: feeds[i.name] for i in self.trunk.get_inputs()}
        hidden = runner(self.trunk, trunk_feeds, ["hidden"])[0]
        mask = feeds["attention_mask"]
        out = {}
        for name, want in wanted.items():
            width = max(lengths[r] for r in want.rows)
            rows = np.asarray(want.rows)
            branch_feeds: Feeds = {
                "hidden": np.ascontiguousarray(hidden[rows, :width]),
                "attention_mask": np.ascontiguousarray(mask[rows, :width]),
            }
            names = ["pooled", "token_embeddings"] if want.tokens else ["pooled"]
            result = runner(self.branches[name], branch_feeds, names)
            states = np.asarray(result[1], dtype=np.float32) if want.tokens else None
            out[name] = BranchOutput(want.rows, np.asarray(result[0], dtype=np.float32), states)
        return out


@dataclass(frozen=True)
class Graphs:
    """One copy of an encoder variant's sessions: the whole graph, or (`parts`) the trunk
    (`main`) and its branches."""

    main: ort.InferenceSession
    parts: BranchSessions | None
