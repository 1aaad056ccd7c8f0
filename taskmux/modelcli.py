"""`taskmux model ...` and `taskmux head ...`: build, train and inspect the model repository."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_model_commands(sub: Any) -> None:
    """Register the `model` (and later `head`) subcommands on the CLI's subparsers."""
    model = sub.add_parser("model", help="Build or train the model repository")
    msub = model.add_subparsers(required=True, metavar="ACTION")
    build = msub.add_parser("build", help="Export the encoder and assemble the repository")
    build.add_argument("--out", type=Path, default=Path("model-repo"))
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    build.set_defaults(func=_model_build)
    train = msub.add_parser("train-sentiment", help="Train the sentiment head on SST-2")
    train.add_argument("--repo", type=Path, default=Path("model-repo"))
    train.add_argument("--data", type=Path, default=Path("../shared/data"))
    train.set_defaults(func=_model_train_sentiment)


def _model_build(args: argparse.Namespace) -> int:
    from taskmux.modelrepo.build import build_repository

    manifest = build_repository(args.out, force=args.force)
    print(manifest.to_json(with_checksums=False))
    return 0


def _model_train_sentiment(args: argparse.Namespace) -> int:
    from taskmux.modelrepo.train import train_sentiment

    report = train_sentiment(args.repo, args.data)
    print(json.dumps(report, indent=2))
    return 0
