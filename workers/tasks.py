"""Per-kind answers: which texts a job needs encoded, and its response from the vectors.

`compute` encodes the union of every job's texts once; each builder here then reads the
rows it needs from the shared `BatchView` and returns the serialized public response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from taskmux_api.kinds import HeadKind, TaskKind
from taskmux_api.v1 import taskmux_pb2 as pb
from tokenizers import Encoding

from model.anonymize import Replacer, Span, Style, anonymize, replacer
from model.encoder import BranchRows, Encoded, Floats
from model.entities import EntitySpan
from model.heads import (
    EmbeddingHead,
    Head,
    LinearClassifierHead,
    SimilarityHead,
    TokenClassifierHead,
    ZeroShotHead,
)
from model.loaded import LoadedModel
from model.manifest import EMBEDDING, HeadSpec
from router.messages import Job, pack_messages

log = logging.getLogger(__name__)

H = TypeVar("H")


ONLY_EMBEDDING = frozenset({EMBEDDING})


@dataclass(frozen=True)
class Needs:
    """What a job needs from the encoder pass: its texts, the branches its heads read
    (`HeadSpec.features`), and the texts whose token states it reads in `token_branches`."""

    texts: tuple[str, ...]
    token_texts: tuple[str, ...] = ()
    branches: frozenset[str] = ONLY_EMBEDDING
    token_branches: frozenset[str] = ONLY_EMBEDDING


@dataclass(frozen=True)
class BatchView:
    """The results of one encoder pass, looked up by text."""

    vectors: Floats  # unit-length sentence vectors of the embedding branch, one per text
    encoded: Encoded
    row_of: dict[str, int]
    # Unit-length vectors of the other branches computed (rows no job needed are zero).
    branch_vectors: dict[str, Floats] = field(default_factory=dict)

    def rows(self, texts: tuple[str, ...] | list[str], branch: str = EMBEDDING) -> Floats:
        """Sentence vectors of `texts` from `branch`, in order."""
        vectors = self.vectors if branch == EMBEDDING else self.branch_vectors[branch]
        return vectors[[self.row_of[t] for t in texts]]

    def tokens(self, text: str, branch: str = EMBEDDING) -> tuple[Floats, Encoding]:
        """Per-token states (of `branch`) and encoding of one text encoded with its tokens."""
        row = self.row_of[text]
        states = self.encoded.token_states if branch == EMBEDDING else (
            self.encoded.features(branch).token_states
        )  # fmt: skip
        return states[row], self.encoded.encodings[row]


def texts_needed(model: LoadedModel, job: Job) -> Needs:
    """The texts to encode for `job`, the branches its heads read, and the texts whose
    token states it reads."""
    if job.kind == TaskKind.ZERO_SHOT:
        missing = [h for h in _hypotheses(job) if h not in model.label_cache]
        return Needs(job.texts + tuple(missing))
    names = job.params.get("heads", []) if job.kind == TaskKind.ANALYZE else [job.head]
    specs = [model.heads[h].spec for h in names]
    token_specs = [s for s in specs if s.kind == HeadKind.TOKEN_CLASSIFICATION]
    return Needs(
        job.texts,
        job.texts if token_specs else (),
        frozenset(s.features for s in specs),
        frozenset(s.features for s in token_specs),
    )


def branch_rows(needs: Iterable[Needs], row_of: Mapping[str, int]) -> dict[str, BranchRows]:
    """Which rows of the batch each branch computes: a branch runs only for the texts of
    jobs whose heads read it, once for all of them."""
    pooled: dict[str, set[int]] = {}
    tokens: dict[str, set[int]] = {}
    for need in needs:
        for branch in need.branches:
            pooled.setdefault(branch, set()).update(row_of[t] for t in need.texts)
        for branch in need.token_branches if need.token_texts else ():
            tokens.setdefault(branch, set()).update(row_of[t] for t in need.token_texts)
    return {b: BranchRows(sorted(rows), sorted(tokens.get(b, ()))) for b, rows in pooled.items()}


def answer(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    """The job's serialized response and how many head results it carries; raises if
    its head cannot compute it (the caller fails this job only)."""
    return BUILDERS[job.kind](model, job, view)


def _embed(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    rows = view.rows(job.texts)
    enc = model.manifest.encoder
    response = pb.EmbedResponse(
        embeddings=[pb.Embedding(values=r.tolist()) for r in rows],
        model=enc.name,
        model_version=enc.version,
    )
    return response.SerializeToString(), len(rows)


def _classify(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    head = _head(model, job.head, LinearClassifierHead)
    probs = head.apply(view.rows(job.texts, head.spec.features))
    enc = model.manifest.encoder
    response = pb.ClassifyResponse(
        results=[classification(head.spec, row, job.top_k) for row in probs],
        model=enc.name,
        model_version=enc.version,
        head=head.spec.name,
        head_version=head.spec.version,
    )
    return response.SerializeToString(), len(job.texts)


def _entities(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    head = _head(model, job.head, TokenClassifierHead)
    enc = model.manifest.encoder
    response = pb.ExtractEntitiesResponse(
        results=entity_lists(head, view, job.texts),
        model=enc.name,
        model_version=enc.version,
        head=head.spec.name,
        head_version=head.spec.version,
    )
    return response.SerializeToString(), len(job.texts)


def _anonymize(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    head = _head(model, job.head, TokenClassifierHead)
    labels = frozenset(job.params["labels"])
    replace = replacer(Style(job.params["style"]))  # one per job: pseudonyms span its texts
    enc = model.manifest.encoder
    response = pb.AnonymizeResponse(
        results=[anonymized(head, view, text, labels, replace) for text in job.texts],
        model=enc.name,
        model_version=enc.version,
        head=head.spec.name,
        head_version=head.spec.version,
    )
    return response.SerializeToString(), len(job.texts)


def _similarity(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    head = _head(model, job.head, SimilarityHead)
    rows = view.rows(job.texts)
    scores = head.scores(rows[0], rows[1:])
    best = np.argsort(-scores, kind="stable")[: job.top_k]
    enc = model.manifest.encoder
    response = pb.SimilarityResponse(
        scores=scores.tolist(),
        top=[pb.ScoredCandidate(index=int(i), score=float(scores[i])) for i in best],
        model=enc.name,
        model_version=enc.version,
    )
    return response.SerializeToString(), len(scores)


def _zero_shot(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    head = _head(model, job.head, ZeroShotHead)
    labels = tuple(job.params["labels"])
    label_vectors = np.stack([_label_vector(model, view, h) for h in _hypotheses(job)])
    probs = head.apply(view.rows(job.texts), label_vectors)
    spec = HeadSpec(head.spec.name, head.spec.kind, head.spec.version, labels)
    enc = model.manifest.encoder
    response = pb.ZeroShotClassifyResponse(
        results=[classification(spec, row, len(labels)) for row in probs],
        model=enc.name,
        model_version=enc.version,
    )
    return response.SerializeToString(), len(job.texts)


def _analyze(model: LoadedModel, job: Job, view: BatchView) -> tuple[bytes, int]:
    results: list[bytes] = []
    options = job.params.get("anonymize", {})
    for name in job.params["heads"]:
        head = model.heads[name]
        base = {"head": name, "head_version": head.spec.version}
        labels = frozenset(options.get("labels", {}).get(name, ()))
        replace = replacer(Style(options["style"])) if labels else None
        for index, value in enumerate(_head_values(head, view, job, labels, replace)):
            result = pb.AnalyzeResult(text_index=index, **base, **value)
            results.append(result.SerializeToString())
    return pack_messages(results), len(results)


def _head_values(
    head: Head, view: BatchView, job: Job, labels: frozenset[str], replace: Replacer | None
) -> list[dict[str, Any]]:
    """One head's result for each text of an Analyze job (the AnalyzeResult field it
    fills), computed for all the job's texts at once."""
    texts = job.texts
    if isinstance(head, TokenClassifierHead) and replace is not None:
        return [{"anonymized": anonymized(head, view, t, labels, replace)} for t in texts]
    if isinstance(head, EmbeddingHead):
        return [{"embedding": pb.Embedding(values=r.tolist())} for r in view.rows(texts)]
    if isinstance(head, LinearClassifierHead):
        probs = head.apply(view.rows(texts, head.spec.features))
        top_k = max(job.top_k, 1)
        return [{"classification": classification(head.spec, p, top_k)} for p in probs]
    if isinstance(head, TokenClassifierHead):
        return [{"entities": e} for e in entity_lists(head, view, texts)]
    raise TypeError(f"head {head.spec.name!r} cannot be analyzed")


def classification(spec: HeadSpec, probs: Floats, top_k: int) -> pb.ClassificationResult:
    """Best label, its score and the top_k ranking; applies the head's rejection threshold."""
    best = np.argsort(-probs, kind="stable")[: max(1, min(top_k, len(spec.labels)))]
    top = [pb.LabelScore(label=spec.labels[j], score=float(probs[j])) for j in best]
    label, score = top[0].label, top[0].score
    if spec.fallback_label and score < spec.threshold:
        label = spec.fallback_label
        score = float(probs[spec.labels.index(label)])
    return pb.ClassificationResult(label=label, score=score, top=top)


def entity_lists(
    head: TokenClassifierHead, view: BatchView, texts: Sequence[str]
) -> list[pb.EntityList]:
    """The entities of each text as the API message, the head applied once to them all."""
    inputs = [(*view.tokens(text, head.spec.features), text) for text in texts]
    return [
        pb.EntityList(
            entities=[
                pb.Entity(text=s.text, label=s.label, start=s.start, end=s.end, score=s.score)
                for s in spans
            ]
        )
        for spans in head.entities_of(inputs)
    ]


def anonymized(
    head: TokenClassifierHead,
    view: BatchView,
    text: str,
    labels: frozenset[str],
    replace: Replacer,
) -> pb.AnonymizedText:
    """One text with the entities of `labels` replaced, as the API message."""
    spans = (Span(s.label, s.start, s.end) for s in _entity_spans(head, view, text))
    result = anonymize(text, spans, labels, replace)
    return pb.AnonymizedText(
        text=result.text,
        spans=[
            pb.AnonymizedSpan(
                label=r.label,
                start=r.start,
                end=r.end,
                output_start=r.output_start,
                output_end=r.output_end,
            )
            for r in result.spans
        ],
    )


def _entity_spans(head: TokenClassifierHead, view: BatchView, text: str) -> list[EntitySpan]:
    states, encoding = view.tokens(text, head.spec.features)
    return head.entities(states, encoding, text)


def _hypotheses(job: Job) -> list[str]:
    template = job.params.get("template") or ZeroShotHead.DEFAULT_TEMPLATE
    return [template.replace("{}", label) for label in job.params["labels"]]


def _label_vector(model: LoadedModel, view: BatchView, hypothesis: str) -> Floats:
    cached = model.label_cache.get(hypothesis)
    if cached is None:
        cached = view.rows([hypothesis])[0]
        model.label_cache.put(hypothesis, cached)
    return cached


def _head(model: LoadedModel, name: str, kind: type[H]) -> H:
    head = model.heads[name]
    if not isinstance(head, kind):
        raise TypeError(f"head {name!r} is not a {kind.__name__}")
    return head


Builder = Callable[[LoadedModel, Job, BatchView], tuple[bytes, int]]
# One builder per task kind.
BUILDERS: dict[str, Builder] = {
    TaskKind.EMBED: _embed,
    TaskKind.CLASSIFY: _classify,
    TaskKind.ENTITIES: _entities,
    TaskKind.SIMILARITY: _similarity,
    TaskKind.ZERO_SHOT: _zero_shot,
    TaskKind.ANALYZE: _analyze,
    TaskKind.ANONYMIZE: _anonymize,
}
