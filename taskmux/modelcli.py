"""`taskmux model ...` and `taskmux head ...`: build, train, evaluate and inspect heads."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskmux.progress import Steps

if TYPE_CHECKING:
    from model.manifest import EncoderSpec, Manifest
    from taskmux.modelrepo.multitask import Recipe

log = logging.getLogger(__name__)

DEFAULT_REPO = Path("model-repo")
DEFAULT_DATA = Path("../shared/data")
DEFAULT_CACHE = Path(".cache/embeddings")  # encoder outputs kept between runs
SHIPPED_HEADS = ("sentiment", "intent", "topic", "entities")
VARIANTS = ("int8", "fp16")  # built besides fp32 (taskmux.modelrepo.quantize)


def add_multitask_command(msub: Any) -> None:
    """`taskmux model train-multitask`: fine-tune the multi-task branch and its heads."""
    train = msub.add_parser(
        "train-multitask",
        help="Fine-tune the multi-task branch and its heads into taskmux/modelrepo/trained/",
    )
    train.add_argument("--data", type=Path, default=DEFAULT_DATA)
    train.add_argument("--out", type=Path, default=None, help="default: trained/multitask/")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument(
        "--branch-layer", type=int, default=2,
        help="layers below it are the shared trunk; the branch fine-tunes the rest",
    )  # fmt: skip
    train.add_argument(
        "--oos-borrowed", type=int, default=300, metavar="N",
        help="N training texts of each other task taught to the intent head as oos",
    )  # fmt: skip
    train.add_argument(
        "--topic-passes", type=_passes, metavar="N",
        help="passes over the topic training rows per epoch (default: the recipe's)",
    )  # fmt: skip
    train.add_argument(
        "--entities-passes", type=_passes, metavar="N",
        help="passes over the entities training rows per epoch (default: the recipe's)",
    )  # fmt: skip
    train.add_argument(
        "--epoch-choice", choices=("joint", "written"), default="joint",
        help="keep the epoch whose joint heads (default) or written heads validate best",
    )  # fmt: skip
    train.add_argument(
        "--ema", type=_decay, metavar="DECAY",
        help="validate and write a moving average of the weights with this decay "
        "(0: off; default: the recipe's)",
    )  # fmt: skip
    train.add_argument("--tiny", action="store_true", help="a few steps on a few rows (smoke)")
    train.add_argument(
        "--refit-only", action="store_true",
        help="only the second stage (larger heads on the written branch) of a run in --out",
    )  # fmt: skip
    train.add_argument(
        "--heldout-only", action="store_true",
        help="only record the held-out figures of the run in --out into its head.json files",
    )  # fmt: skip
    train.set_defaults(func=_model_train_multitask)


def _passes(value: str) -> int:
    """Passes over a task's rows per epoch: a whole number, at least 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a number of passes: give 1 or more")
    return int(value)


def _decay(value: str) -> float:
    """A moving average's decay: at least 0 (off) and below 1."""
    refusal = argparse.ArgumentTypeError(f"{value} is not a decay: give 0 (off) up to below 1")
    try:
        decay = float(value)
    except ValueError:
        raise refusal from None
    if not 0 <= decay < 1:
        raise refusal
    return decay


def multitask_recipe(args: argparse.Namespace) -> Recipe:
    """The run's recipe: flags left out keep the Recipe's defaults (the committed branch's)."""
    from taskmux.modelrepo.multitask import Recipe

    given = {"topic_passes": args.topic_passes, "entities_passes": args.entities_passes,
             "ema": args.ema}  # fmt: skip
    return Recipe(
        seed=args.seed, epochs=args.epochs, branch_layer=args.branch_layer,
        log_every=2 if args.tiny else 25, epoch_choice=args.epoch_choice,
        **{name: value for name, value in given.items() if value is not None},
    )  # fmt: skip


def _model_train_multitask(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from taskmux.modelrepo.multitask import heldout_written, refit_written, train_multitask
    from taskmux.modelrepo.multitask_data import TINY, Sizes
    from taskmux.modelrepo.multitask_store import MULTITASK_DIR

    recipe = multitask_recipe(args)
    run: Callable[..., dict[str, Any]] = train_multitask
    if args.tiny:
        run = partial(train_multitask, score_heldout=False)
    run = refit_written if args.refit_only else run
    run = heldout_written if args.heldout_only else run
    report = run(
        args.data, out_dir=args.out or MULTITASK_DIR, recipe=recipe,
        sizes=replace(TINY if args.tiny else Sizes(), oos_borrowed=args.oos_borrowed),
        emit=partial(print, flush=True),
    )  # fmt: skip
    print(json.dumps(report, indent=2))
    print("rebuild the repository to serve it: taskmux model build --force", file=sys.stderr)
    return 0


def add_encoder_flags(build: argparse.ArgumentParser) -> None:
    """`model build --encoder PATH`: another encoder than the packaged all-MiniLM-L6-v2."""
    build.add_argument(
        "--encoder", type=Path, default=None, metavar="PATH",
        help="a BERT-family sentence-transformers folder to build from instead of the "
        "packaged all-MiniLM-L6-v2 (its heads are trained on it from --data)",
    )  # fmt: skip
    build.add_argument(
        "--data", type=Path, default=DEFAULT_DATA,
        help=f"the labelled data (default {DEFAULT_DATA}): int8 is calibrated on its training "
        "texts (not needed without int8), and with --encoder the shipped heads train on it",
    )  # fmt: skip
    build.add_argument(
        "--no-heads", action="store_true",
        help="with --encoder: train no head (embed, similarity and zero-shot only)",
    )  # fmt: skip
    build.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    build.add_argument("--no-cache", action="store_true", help="recompute encoder outputs")


def add_model_commands(sub: Any) -> None:
    """Register the `model` and `head` subcommands on the CLI's subparsers."""
    model = sub.add_parser("model", help="Build, train or evaluate the model repository")
    msub = model.add_subparsers(required=True, metavar="ACTION")
    build = msub.add_parser("build", help="Export the encoder and assemble the repository")
    build.add_argument("--out", type=Path, default=DEFAULT_REPO)
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    build.add_argument(
        "--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT",
        help=f"encoder variants to build besides fp32 (default: {' '.join(VARIANTS)})",
    )  # fmt: skip
    _add_output_flags(build, "the manifest (without checksums)", "a summary")
    add_encoder_flags(build)
    build.set_defaults(func=_model_build)
    bench = msub.add_parser(
        "bench-variants", help="Encoder texts/s of each variant side by side (CPU)"
    )
    bench.add_argument("--repo", type=Path, default=DEFAULT_REPO)
    bench.add_argument("--data", type=Path, default=DEFAULT_DATA)
    bench.add_argument("--variants", nargs="+", default=["fp32", "int8"], metavar="VARIANT")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: ORT's")
    bench.add_argument("--rounds", type=int, default=5)
    bench.add_argument(
        "--tokens", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"),
        help="text lengths in word pieces, [CLS] and [SEP] included",
    )  # fmt: skip
    bench.set_defaults(func=_model_bench)

    sentiment = msub.add_parser("train-sentiment", help="Retrain the sentiment head only")
    defaults = msub.add_parser(
        "train-defaults", help="Retrain every shipped head into taskmux/modelrepo/trained/"
    )
    defaults.add_argument(
        "--only", nargs="+", choices=SHIPPED_HEADS, default=list(SHIPPED_HEADS), metavar="HEAD"
    )
    add_multitask_command(msub)
    evaluate = msub.add_parser(
        "eval", help="Recompute each shipped head's held-out figure; non-zero exit on a FAIL"
    )
    evaluate.add_argument(
        "--card", type=Path, default=None,
        help="where to write the model card (default: MODEL_CARD.md for the packaged encoder, "
        "<repo>/MODEL_CARD.md for an encoder of your own)",
    )  # fmt: skip
    evaluate.add_argument(
        "--variant", choices=("int8",), default=None,
        help="also compare this encoder variant with fp32 and record the figures in the "
        "manifest and taskmux/modelrepo/trained/encoder/variants.json",
    )  # fmt: skip
    for p in (sentiment, defaults):
        _add_output_flags(p, "each head's training report", "a summary")
    _add_output_flags(evaluate, "the figures (and the variant's, with --variant)", "tables")
    for p in (sentiment, defaults, evaluate):
        p.add_argument("--repo", type=Path, default=DEFAULT_REPO)
        p.add_argument("--data", type=Path, default=DEFAULT_DATA)
        p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
        p.add_argument("--no-cache", action="store_true", help="recompute encoder outputs")
    sentiment.set_defaults(func=_model_train, only=["sentiment"], action="train-sentiment")
    defaults.set_defaults(func=_model_train, action="train-defaults")
    evaluate.set_defaults(func=_model_eval)

    head = sub.add_parser("head", help="Train or list task heads of a model repository")
    hsub = head.add_subparsers(required=True, metavar="ACTION")
    train = hsub.add_parser("train", help="Train a head from a labelled file into the repository")
    train.add_argument("--kind", choices=("classification", "token"), default="classification")
    train.add_argument("--name", required=True, help="[a-z][a-z0-9_-]{0,62}")
    train.add_argument(
        "--data", type=Path, required=True, help="CSV/TSV/JSONL, or CoNLL for --kind token"
    )
    train.add_argument("--repo", type=Path, default=DEFAULT_REPO)
    train.add_argument("--text-column", default="text")
    train.add_argument("--label-column", default="label")
    train.add_argument(
        "--hidden", type=int, default=None, help="hidden units (default 0 for classification, "
        "i.e. softmax regression, and 256 for token heads)",
    )  # fmt: skip
    train.add_argument("--scheme", choices=("io", "bio"), default="io", help="token tags")
    train.add_argument("--seed", type=int, default=0, help="of the held-out split and the fit")
    train.add_argument(
        "--features", choices=("embedding", "multitask"), default="embedding",
        help="what the head reads: the original encoder's output (as Embed returns it), or "
        "the multi-task branch (fine-tuned on the shipped tasks: usually better, and shared "
        "with the trained heads' pass)",
    )  # fmt: skip
    tune = train.add_argument_group(
        "--fine-tune", "a branch of the head's own: the encoder's upper layers fine-tuned with "
        "it (better figures; costs a branch pass per text sent to it, minutes of CPU to "
        "train, and ~28 MB plus variants in the repository)",
    )  # fmt: skip
    tune.add_argument("--fine-tune", action="store_true", help="train a branch with the head")
    tune.add_argument(
        "--epochs", type=int, default=0,
        help="of --fine-tune; default: 1 or 2 for thousands of rows, more for a small file",
    )  # fmt: skip
    tune.add_argument("--branch-lr", type=float, default=1e-4, help="of --fine-tune")
    tune.add_argument("--threads", type=int, default=1, help="torch threads for --fine-tune")
    train.set_defaults(func=_head_train)
    listing = hsub.add_parser("list", help="Print the repository's heads")
    listing.add_argument("--repo", type=Path, default=DEFAULT_REPO)
    listing.set_defaults(func=_head_list)


def _add_output_flags(parser: argparse.ArgumentParser, what: str, instead: str) -> None:
    parser.add_argument(
        "--json", action="store_true", help=f"print {what} as JSON instead of {instead}"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log each step's details besides its line"
    )


def _steps(args: argparse.Namespace) -> Steps:
    """A line per step on stderr; the steps stand for modelrepo's info logs unless --verbose."""
    if not args.verbose:
        logging.getLogger("taskmux.modelrepo").setLevel(logging.WARNING)
    return Steps(sys.stderr)


def _model_build(args: argparse.Namespace) -> int:
    from model.manifest import MANIFEST_FILE
    from taskmux.modelrepo.build import build_repository
    from taskmux.modelrepo.calibration import CalibrationError

    if args.encoder is not None:
        return _model_build_own(args)
    started = time.monotonic()
    existed = not args.force and (args.out / MANIFEST_FILE).exists()
    try:
        manifest = build_repository(
            args.out, force=args.force, variants=args.variants, steps=_steps(args),
            data_dir=args.data,
        )  # fmt: skip
    except CalibrationError as err:
        print(f"taskmux model build: {err}", file=sys.stderr)
        return 2
    return _print_built(args, manifest, None if existed else time.monotonic() - started)


def _print_built(args: argparse.Namespace, manifest: Manifest, seconds: float | None) -> int:
    """What `model build` prints: the manifest with --json, else the summary."""
    from taskmux.modelrepo.summary import build_summary

    if args.json:
        print(manifest.to_json(with_checksums=False))
    else:
        print(build_summary(manifest, args.out, seconds))
    return 0


def _model_build_own(args: argparse.Namespace) -> int:
    from model.manifest import MANIFEST_FILE, load_manifest
    from taskmux.modelrepo.calibration import CalibrationError
    from taskmux.modelrepo.shipped import missing_data
    from taskmux.modelrepo.stfolder import EncoderFolderError, read_encoder_folder

    def refuse(why: str) -> int:
        print(f"taskmux model build: {why}", file=sys.stderr)
        return 2

    try:
        folder = read_encoder_folder(args.encoder)
    except EncoderFolderError as err:
        return refuse(str(err))
    data = None if args.no_heads else args.data
    missing = [] if data is None else missing_data(data)
    if missing:
        files = ", ".join(str(f) for f in missing)
        return refuse(f"--data {data} lacks {files}: give the folder laid out as "
                      f"{DEFAULT_DATA}, or --no-heads")  # fmt: skip
    from taskmux.modelrepo.own_encoder import ParityError, build_own_repository, encoder_spec
    from taskmux.modelrepo.summary import build_summary

    if (args.out / MANIFEST_FILE).exists() and not args.force:
        there = load_manifest(args.out, verify=False)
        if there.encoder.version != encoder_spec(folder).version:
            held = f"{there.encoder.name} {there.encoder.version}"
            return refuse(f"{args.out} holds the encoder {held}; add --force to rebuild it "
                          f"from {folder.path}")  # fmt: skip
        print(build_summary(there, args.out, None))
        return 0
    steps = _steps(args)
    if not args.verbose:  # the parity check's and head training's encoder logs
        for name in ("model.encoder", "sentence_transformers"):
            logging.getLogger(name).setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        manifest, _ = build_own_repository(
            args.out, folder, variants=args.variants, data_dir=data,
            calibration_dir=args.data, cache_dir=_cache(args), steps=steps,
        )  # fmt: skip
    except CalibrationError as err:
        return refuse(str(err))
    except ParityError as err:
        print(f"taskmux model build: {err}", file=sys.stderr)
        return 1
    return _print_built(args, manifest, time.monotonic() - started)


def _model_bench(args: argparse.Namespace) -> int:
    from model.manifest import ModelRepoError
    from taskmux.modelrepo.variant_bench import format_bench, measure

    try:
        bench = measure(
            args.repo,
            args.data,
            args.variants,
            batch_size=args.batch_size,
            threads=args.threads,
            rounds=args.rounds,
            tokens=(args.tokens[0], args.tokens[1]),
        )
    except ModelRepoError as err:
        print(f"taskmux model bench-variants: {err}", file=sys.stderr)
        return 2
    print(format_bench(bench))
    return 0


def _cache(args: argparse.Namespace) -> Path | None:
    return None if args.no_cache else Path(args.cache_dir)


def _model_train(args: argparse.Namespace) -> int:
    from model.manifest import ModelRepoError, load_manifest
    from taskmux.modelrepo.build import TRAINED_HEADS_DIR, is_packaged, trained_heads
    from taskmux.modelrepo.shipped import TRAINERS
    from taskmux.modelrepo.summary import train_summary

    try:
        encoder = load_manifest(args.repo, verify=False).encoder
    except ModelRepoError as err:
        print(f"taskmux model {args.action}: {err}", file=sys.stderr)
        return 2
    if not is_packaged(encoder):
        # The committed heads are what every packaged build serves: they must stay MiniLM's.
        print(
            f"taskmux model {args.action}: {args.repo} holds the encoder {encoder.name}, and "
            "the committed heads belong to all-MiniLM-L6-v2; to train them on your encoder: "
            "taskmux model build --encoder PATH --force",
            file=sys.stderr,
        )
        return 2
    steps = _steps(args)
    steps.expect(len(args.only))
    started = time.monotonic()
    reports = {}
    for name in args.only:
        what = f"train the {name} head"
        with steps.step(what):
            reports[name] = TRAINERS[name](args.repo, args.data, cache_dir=_cache(args))
        reports[name]["seconds"] = round(steps.durations[what], 1)
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        heads = [spec for spec, _ in trained_heads() if spec.name in reports]
        print(train_summary(heads, TRAINED_HEADS_DIR, time.monotonic() - started))
    print("rebuild the repository to serve them: taskmux model build --force", file=sys.stderr)
    return 0


def _card_path(repo: Path, encoder: EncoderSpec) -> Path:
    """The project's MODEL_CARD.md describes the packaged encoder; another encoder's card
    goes into its own repository, so an eval never overwrites the project's."""
    from taskmux.modelrepo.build import is_packaged

    return Path("MODEL_CARD.md") if is_packaged(encoder) else repo / "MODEL_CARD.md"


def _model_eval(args: argparse.Namespace) -> int:
    from model.manifest import ModelRepoError, load_manifest
    from taskmux.modelrepo.evaluate import evaluate, format_table
    from taskmux.modelrepo.model_card import render
    from taskmux.modelrepo.multitask_card import branch_section
    from taskmux.modelrepo.variant_eval import card_section, compare, format_comparison, store

    started = time.monotonic()
    steps = _steps(args)
    steps.expect(2 if args.variant else 1)
    with steps.step("evaluate the shipped heads on held-out data"):
        figures = evaluate(args.repo, args.data, cache_dir=_cache(args))
    if not args.json:
        print(format_table(figures))
    variant_metrics = None
    if args.variant:
        try:
            with steps.step(f"compare the {args.variant} encoder with fp32"):
                comparison = compare(args.repo, args.data, args.variant, figures)
        except ModelRepoError as err:
            print(f"taskmux model eval: {err}", file=sys.stderr)
            return 2
        if not args.json:
            print("\n" + format_comparison(comparison))
        store(args.repo, comparison)
        variant_metrics = comparison.metrics()
    if args.json:
        rows = [{**asdict(f), "passed": f.passed} for f in figures]
        print(json.dumps({"figures": rows, "variant": variant_metrics}, indent=2))
    manifest = load_manifest(args.repo, verify=False)
    card = render(manifest, figures) + branch_section(manifest, figures) + card_section(manifest)
    path = args.card or _card_path(args.repo, manifest.encoder)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(path)
    failed = [f for f in figures if f.passed is False]
    seconds = time.monotonic() - started
    print(f"\n{path} written; {len(failed)} FAIL; {seconds:.0f} s", file=sys.stderr)
    return 1 if failed else 0


def _head_train(args: argparse.Namespace) -> int:
    from model.manifest import ModelRepoError
    from taskmux.modelrepo.custom import train_classification_head, train_token_head
    from taskmux.modelrepo.finetune import FineTune

    fine_tune = None
    if args.fine_tune:
        if args.features != "embedding" or args.hidden:
            print(
                "taskmux head train: --fine-tune trains a linear head on a branch of its own "
                "(a copy of the embedding branch); drop --features and --hidden",
                file=sys.stderr,
            )
            return 2
        fine_tune = FineTune(
            epochs=args.epochs, branch_lr=args.branch_lr, threads=args.threads, seed=args.seed
        )
    try:
        if args.kind == "token":
            report = train_token_head(
                args.repo, args.data, args.name, scheme=args.scheme,
                hidden=256 if args.hidden is None else args.hidden, seed=args.seed,
                features=args.features, fine_tune=fine_tune,
            )  # fmt: skip
        else:
            report = train_classification_head(
                args.repo, args.data, args.name, text_column=args.text_column,
                label_column=args.label_column, hidden=args.hidden or 0, seed=args.seed,
                features=args.features, fine_tune=fine_tune,
            )  # fmt: skip
    except (ValueError, ModelRepoError) as err:
        print(f"taskmux head train: {err}; nothing was written", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    if fine_tune is not None:
        print(
            f"branch {report['features']} is in the manifest: running workers open it and serve "
            "the head without a restart", file=sys.stderr,
        )  # fmt: skip
    return 0


def _head_list(args: argparse.Namespace) -> int:
    from model.manifest import ModelRepoError, load_manifest
    from taskmux.modelrepo.headstore import format_heads

    try:
        manifest = load_manifest(args.repo, verify=False)
    except ModelRepoError as err:
        print(f"taskmux head list: {err}", file=sys.stderr)
        return 2
    print(format_heads(manifest))
    return 0
