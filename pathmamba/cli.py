"""Command line: ``python -m pathmamba <command>``; usable with or without Snakemake."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _add_make_demo_data(commands) -> None:
    parser = commands.add_parser("make-demo-data", help="write a synthetic dataset in a published layout")
    parser.add_argument("--dataset", required=True, choices=["synthetic-luad", "synthetic-bcss"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--size", type=int, default=224, help="patch side in pixels")
    parser.add_argument("--seed", type=int, default=0)


def _add_train(commands) -> None:
    from pathmamba.train import TrainSettings

    defaults = TrainSettings()
    parser = commands.add_parser("train", help="train one method on one dataset with one seed")
    parser.add_argument("--method", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for model.pt, history.csv, run.json")
    parser.add_argument("--checkpoint-dir", required=True, type=Path,
                        help="folder for the resumable checkpoint (kept outside workflow outputs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hparams", type=_json_object, default={}, help="model keywords as a JSON object")
    parser.add_argument("--settings", type=_json_object, default={},
                        help=f"training settings as a JSON object; keys and defaults: {defaults}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="evaluate a trained model on the test split")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for test_metrics.json, per_image.csv")
    parser.add_argument("--masks-dir", type=Path, default=None)
    parser.add_argument("--n-masks", type=int, default=4)
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                        help="average the scores over flips")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)


def _add_trivial(commands) -> None:
    parser = commands.add_parser("evaluate-trivial", help="score the trivial one-class-per-image reference")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)


def _add_aggregate(commands) -> None:
    parser = commands.add_parser("aggregate", help="mean +- std over seeds into the comparison table")
    parser.add_argument("metrics", nargs="+", type=Path, help="test_metrics.json files")
    parser.add_argument("--out-csv", required=True, type=Path)
    parser.add_argument("--out-md", required=True, type=Path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathmamba", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_make_demo_data, _add_train, _add_evaluate, _add_trivial, _add_aggregate):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "make-demo-data":
        from pathmamba.data.synthetic import make_synthetic_dataset

        counts = make_synthetic_dataset(args.dataset, args.out, args.n_train, args.n_val, args.n_test,
                                        size=args.size, seed=args.seed)
        logging.getLogger("pathmamba").info("wrote %s to %s: %s", args.dataset, args.out, counts)
    elif args.command == "train":
        from pathmamba.train import TrainSettings, train

        try:
            settings = TrainSettings(**args.settings)
        except TypeError as error:
            raise SystemExit(f"--settings: {error}; valid keys: {', '.join(TrainSettings.__dataclass_fields__)}")
        train(args.method, args.dataset, args.data_root, args.out, args.checkpoint_dir, args.seed,
              args.hparams, settings)
    elif args.command == "evaluate":
        from pathmamba.evaluate import evaluate

        evaluate(args.model, args.data_root, args.out, args.masks_dir, args.n_masks, args.tta, args.device,
                 args.batch_size)
    elif args.command == "evaluate-trivial":
        from pathmamba.evaluate import evaluate_trivial

        evaluate_trivial(args.dataset, args.data_root, args.out)
    elif args.command == "aggregate":
        from pathmamba.aggregate import write_comparison

        write_comparison(args.metrics, args.out_csv, args.out_md)
    return 0
