"""The task commands, one per RPC: embed, classify, extract-entities, similarity,
zero-shot, analyze and anonymize. Each turns a batch's response into one record per input
text ({"index": i, "text": ..., and the result}); clirun runs them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskmux.clientargs import add_connection_arguments
from taskmux.cliinput import INPUT_FORMATS, STDIN, Batch
from taskmux.clioutput import OUTPUT_FORMATS, BatchResult, Column, Record
from taskmux.clirun import TaskCommand, run_task_command

if TYPE_CHECKING:
    from google.protobuf.message import Message
    from taskmux_client import AsyncTaskMuxClient

DEFAULT_BATCH_SIZE = 32  # a quarter of the gateway's default max_texts_per_request (128)
DEFAULT_CONCURRENCY = 4

EPILOG = """\
texts: as arguments, or --input FILE (- for stdin) with one text per line; a line that
is a JSON object with a string "text" field is that text (--input-format auto, the
default). Blank lines are skipped, so "index" counts texts.

output: JSON for texts given as arguments (one document, as the RPC answers); JSONL for
--input, one line per text in input order, {"index": i, "text": ..., result}.

exit status: 0 done; 1 the gateway refused or failed a call; 2 unusable options or input
"""


def add_task_commands(sub: Any) -> None:
    """Register every task command on the CLI's subparsers."""
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        _add_io_arguments(p)
        add_connection_arguments(p)
        p.set_defaults(func=lambda args, c=command: run_task_command(c, args))


def _add_io_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help="texts (or --input)")
    group = p.add_argument_group("input and output")
    group.add_argument("--input", metavar="FILE", help=f"read texts from FILE ({STDIN}: stdin)")
    group.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    group.add_argument(
        "--format", choices=OUTPUT_FORMATS, help="default: json for arguments, jsonl for --input"
    )
    group.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"texts per request ({DEFAULT_BATCH_SIZE})",
    )
    group.add_argument(
        "--concurrency",
        type=_positive,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight ({DEFAULT_CONCURRENCY})",
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list, e.g. "sports,cooking"."""
    names = tuple(v.strip() for v in value.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{value!r} has an empty item")
    return names


def _as_dict(message: Message) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    # Zeros printed too: an entity at offset 0 has "start": 0, not no start.
    return MessageToDict(message, always_print_fields_with_no_presence=True)


def _record(batch: Batch, i: int, **result: Any) -> Record:
    return {"index": batch.start + i, "text": batch.texts[i], **result}


def _merged(results: list[BatchResult], _args: argparse.Namespace) -> dict[str, Any]:
    """The batches' responses as one: repeated fields joined in order (MergeFrom)."""
    responses = [r for result in results for r in result.responses]
    if not responses:
        return {}
    merged = type(responses[0])()
    for response in responses:
        merged.MergeFrom(response)
    return _as_dict(merged)


# ---------------------------------------------------------------- embed


def _embed_arguments(_p: argparse.ArgumentParser) -> None:
    pass


async def _embed(client: AsyncTaskMuxClient, _args: argparse.Namespace, b: Batch) -> BatchResult:
    response = await client.embed(b.texts)
    vectors = _as_dict(response)["embeddings"]
    records = [_record(b, i, embedding=v["values"]) for i, v in enumerate(vectors)]
    return BatchResult(records, [response])


def _embedding_cell(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in values[:3]) + ", …]"


def _embed_columns(_args: argparse.Namespace) -> list[Column]:
    return [
        Column("dims", 4, lambda r: str(len(r["embedding"]))),
        Column("embedding", 27, lambda r: _embedding_cell(r["embedding"])),
    ]


# ---------------------------------------------------------------- classify, zero-shot


def _classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", required=True, help="classification head, e.g. sentiment")
    p.add_argument("--top-k", type=int, default=1, help="best labels per text (1)")


async def _classify(client: AsyncTaskMuxClient, args: argparse.Namespace, b: Batch) -> BatchResult:
    response = await client.classify(args.head, b.texts, top_k=args.top_k)
    return _classifications(b, response)


def _zero_shot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", type=_names, required=True, help="e.g. sports,cooking,politics")
    p.add_argument("--template", default="", help='hypothesis ("This text is about {}.")')


async def _zero_shot(client: AsyncTaskMuxClient, args: argparse.Namespace, b: Batch) -> BatchResult:
    response = await client.zero_shot_classify(
        b.texts, args.labels, hypothesis_template=args.template
    )
    return _classifications(b, response)


def _classifications(b: Batch, response: Any) -> BatchResult:
    results = _as_dict(response)["results"]
    return BatchResult([_record(b, i, **r) for i, r in enumerate(results)], [response])


def _label_columns(_args: argparse.Namespace) -> list[Column]:
    return [
        Column("label", 18, lambda r: str(r["label"])),
        Column("score", 6, lambda r: f"{r['score']:.3f}"),
    ]


# ---------------------------------------------------------------- extract-entities


def _entities_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", default="", help="token classification head (entities)")


async def _entities(client: AsyncTaskMuxClient, args: argparse.Namespace, b: Batch) -> BatchResult:
    response = await client.extract_entities(b.texts, head=args.head)
    lists = _as_dict(response)["results"]
    records = [_record(b, i, entities=e["entities"]) for i, e in enumerate(lists)]
    return BatchResult(records, [response])


def _entities_cell(entities: list[dict[str, Any]]) -> str:
    return ", ".join(f"{e['text']}/{e['label']}" for e in entities) or "-"


def _entities_columns(_args: argparse.Namespace) -> list[Column]:
    return [Column("entities", 40, lambda r: _entities_cell(r["entities"]))]


# ---------------------------------------------------------------- anonymize

STYLES = ("placeholder", "pseudonym")


def _anonymize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", type=_names, default=(), help="entity labels (PER,ORG,LOC)")
    p.add_argument(
        "--style",
        choices=STYLES,
        default="placeholder",
        help='"[PER]", or "PER_1": the same name, the same pseudonym within a batch',
    )
    p.add_argument("--head", default="", help="token classification head (entities)")


async def _anonymize(client: AsyncTaskMuxClient, args: argparse.Namespace, b: Batch) -> BatchResult:
    from taskmux_api.v1 import taskmux_pb2 as pb

    style = pb.AnonymizeStyle.Value(f"ANONYMIZE_STYLE_{args.style.upper()}")
    response = await client.anonymize(b.texts, labels=args.labels, style=style, head=args.head)
    results = _as_dict(response)["results"]
    # The record's text is the anonymized one: the output never repeats an original.
    records = [{"index": b.start + i, **r} for i, r in enumerate(results)]
    return BatchResult(records, [response])


def _anonymize_columns(_args: argparse.Namespace) -> list[Column]:
    return [Column("replaced", 8, lambda r: str(len(r["spans"])))]


# ---------------------------------------------------------------- similarity


def _similarity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query", required=True, help="the text the candidates (texts) are scored to")
    p.add_argument("--top-k", type=int, default=0, help="--format json: the best K, ranked")


async def _similarity(
    client: AsyncTaskMuxClient, args: argparse.Namespace, b: Batch
) -> BatchResult:
    response = await client.similarity(args.query, b.texts)
    scores = _as_dict(response)["scores"]
    records = [_record(b, i, score=s) for i, s in enumerate(scores)]
    return BatchResult(records, [response])


def _similarity_merge(results: list[BatchResult], args: argparse.Namespace) -> dict[str, Any]:
    """One SimilarityResponse's fields, with `top` ranked over every batch's candidates."""
    document = _merged(results, args)
    scores: list[float] = document.get("scores", [])
    best = sorted(range(len(scores)), key=lambda i: -scores[i])[: args.top_k]
    document["top"] = [{"index": i, "score": scores[i]} for i in best]
    return document


def _score_columns(_args: argparse.Namespace) -> list[Column]:
    return [Column("score", 6, lambda r: f"{r['score']:.3f}")]


# ---------------------------------------------------------------- analyze


def _analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heads", type=_names, required=True, help="e.g. embed,sentiment,entities,topic"
    )
    p.add_argument("--top-k", type=int, default=1, help="best labels per classification (1)")


async def _analyze(client: AsyncTaskMuxClient, args: argparse.Namespace, b: Batch) -> BatchResult:
    results = [r async for r in client.analyze(b.texts, args.heads, top_k=args.top_k)]
    by_text: list[dict[str, Any]] = [{} for _ in b.texts]
    for result in results:
        by_text[result.text_index][result.head] = _analyze_value(result)
        result.text_index += b.start  # --format json numbers texts over the whole input
    records = [_record(b, i, **heads) for i, heads in enumerate(by_text)]
    return BatchResult(records, results)


def _analyze_value(result: Any) -> Any:
    """What one head said of one text: a vector, a classification or an entity list."""
    kind = result.WhichOneof("result")
    value = _as_dict(getattr(result, kind))
    if kind == "embedding":
        return value["values"]
    if kind == "entities":
        return value["entities"]
    return value


def _analyze_merge(results: list[BatchResult], _args: argparse.Namespace) -> dict[str, Any]:
    return {"results": [_as_dict(r) for result in results for r in result.responses]}


def _analyze_cell(value: Any) -> str:
    if isinstance(value, dict):
        return f"{value['label']} {value['score']:.2f}"
    if value and isinstance(value[0], dict):
        return _entities_cell(value)
    return f"{len(value)} dims" if value else "-"


def _analyze_columns(args: argparse.Namespace) -> list[Column]:
    return [Column(head, 18, _head_cell(head)) for head in args.heads]


def _head_cell(head: str) -> Callable[[Record], str]:
    return lambda record: _analyze_cell(record[head])


COMMANDS = (
    TaskCommand("embed", "Embed texts", _embed_arguments, _embed, _merged, _embed_columns),
    TaskCommand(
        "classify",
        "Classify texts with a head",
        _classify_arguments,
        _classify,
        _merged,
        _label_columns,
    ),
    TaskCommand(
        "extract-entities",
        "Find the named entities of texts, with offsets",
        _entities_arguments,
        _entities,
        _merged,
        _entities_columns,
    ),
    TaskCommand(
        "similarity",
        "Score texts (the candidates) against --query by cosine",
        _similarity_arguments,
        _similarity,
        _similarity_merge,
        _score_columns,
    ),
    TaskCommand(
        "zero-shot",
        "Classify texts into --labels, with no training",
        _zero_shot_arguments,
        _zero_shot,
        _merged,
        _label_columns,
    ),
    TaskCommand(
        "analyze",
        "Run several heads on texts (one encoder pass each)",
        _analyze_arguments,
        _analyze,
        _analyze_merge,
        _analyze_columns,
    ),
    TaskCommand(
        "anonymize",
        "Replace the named entities of texts by placeholders or pseudonyms",
        _anonymize_arguments,
        _anonymize,
        _merged,
        _anonymize_columns,
    ),
)
