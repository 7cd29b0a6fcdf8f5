"""Command line: ``python -m pathmamba <command>``; usable with or without Snakemake.

Building the parser imports nothing heavy (no torch, pandas or snakemake): each command imports what it
needs when it runs, so that ``--help``, ``plan`` and the like start in a fraction of a second
(tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from pathmamba import __version__
from pathmamba.core import layout
from pathmamba.core.settings import PRECISIONS, SCAN_IMPLEMENTATIONS


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _device(text: str) -> str:
    """An argparse type: a device setting's form (``auto``, ``cpu``, ``cuda``, ``cuda:N``); whether this
    machine has it is checked where the device is resolved."""
    index = text.removeprefix("cuda:")
    if text in ("auto", "cpu", "cuda") or (index != text and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected auto, cpu, cuda or cuda:N")


def _method(text: str) -> str:
    """An argparse type: a registered method's name."""
    from pathmamba.engine.registry import method_names

    if text not in method_names():
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; registered methods: {', '.join(method_names())}")
    return text


def _dataset(text: str) -> str:
    """An argparse type: a shipped dataset's name or a dataset description file's path, checked."""
    from pathmamba.data.specs import DescriptionError, get_dataset_spec

    try:
        get_dataset_spec(text)
    except (KeyError, DescriptionError) as error:
        raise argparse.ArgumentTypeError(error.args[0]) from None
    return text


def _dataset_name(text: str) -> str:
    """An argparse type: a dataset's name as results carry it (a user's dataset has no shipped description
    to look up by name; tables and figures read the description its results recorded)."""
    from pathmamba.data.specs import NAME_PATTERN, NAME_RULE

    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dataset name; expected {NAME_RULE}")
    return text


def _add_dataset_argument(parser) -> None:
    from pathmamba.data.specs import dataset_names

    parser.add_argument("--dataset", required=True, type=_dataset,
                        help=f"a shipped dataset ({', '.join(dataset_names())}) or the path of a dataset "
                             "description file (docs/adding-a-dataset.md)")


def _add_make_demo_data(commands) -> None:
    parser = commands.add_parser("make-demo-data", help="write a synthetic dataset in the layout its description says")
    parser.set_defaults(func=_make_demo_data)
    _add_dataset_argument(parser)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--size", type=int, default=224, help="patch side in pixels")
    parser.add_argument("--seed", type=int, default=0)


def _add_train(commands) -> None:
    from pathmamba.core.settings import TrainSettings
    from pathmamba.engine.registry import method_names

    defaults = TrainSettings()
    parser = commands.add_parser("train", help="train one method on one dataset with one seed")
    parser.set_defaults(func=_train)
    parser.add_argument("--method", required=True, choices=method_names())
    _add_dataset_argument(parser)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for model.pt, history.csv, run.json")
    parser.add_argument("--checkpoint-dir", required=True, type=Path,
                        help="folder for the resumable checkpoint (kept outside workflow outputs)")
    _add_validated_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hparams", type=_json_object, default={}, help="model keywords as a JSON object")
    parser.add_argument("--settings", type=_json_object, default={},
                        help=f"training settings as a JSON object; keys and defaults: {defaults}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--stage", type=int, choices=[1], default=None,
                        help="train the first stage of a two-stage method (wsss-tissue)")
    parser.add_argument("--stage1-model", type=Path, default=None,
                        help="a two-stage method: its first stage's model.pt (`train --stage 1`)")
    parser.add_argument("--pseudo-masks", type=Path, default=None,
                        help="a two-stage method: the folder written by `pseudo-masks` from --stage1-model")


def _add_pseudo_masks(commands) -> None:
    parser = commands.add_parser("pseudo-masks", help="write a first stage's pseudo masks of every training image")
    parser.set_defaults(func=_pseudo_masks)
    parser.add_argument("--model", required=True, type=Path, help="the first stage's model.pt")
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="the pseudo-mask folder to create")
    _add_validated_argument(parser)
    _add_device_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)


def _add_device_arguments(parser) -> None:
    """Where and how a trained model runs; scan and precision default to the model's training settings."""
    parser.add_argument("--device", type=_device, default="auto",
                        help="auto, cpu or cuda[:N] (cuda without a GPU is an error)")
    parser.add_argument("--scan", choices=SCAN_IMPLEMENTATIONS, default=None,
                        help="selective scan implementation (default: the one the model was trained with)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="bf16 autocast or fp32 (default: the precision the model was trained with)")


def _add_validated_argument(parser) -> None:
    parser.add_argument("--validated", type=Path, default=None,
                        help="the dataset's validation report (validate-dataset --out): refuse data whose files "
                             "changed since")


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="evaluate a trained model on the test split")
    parser.set_defaults(func=_evaluate)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for test_metrics.json, per_image.csv")
    _add_validated_argument(parser)
    parser.add_argument("--masks-dir", type=Path, default=None)
    parser.add_argument("--n-masks", type=int, default=4)
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                        help="average the scores over flips")
    _add_device_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)


def _add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="segment your own images with a trained model: palette masks, "
                                                 "overlays and class shares (large images in tiles)")
    parser.set_defaults(func=_predict)
    parser.add_argument("--model", required=True, type=Path, help="a model.pt or a folder written by `export`")
    parser.add_argument("--input", required=True, type=Path,
                        help="an image (PNG, JPEG, TIFF, BMP) or a folder of them")
    parser.add_argument("--out", required=True, type=Path,
                        help="the folder to create (an existing one only if empty or an earlier prediction)")
    _add_device_arguments(parser)
    parser.add_argument("--batch-size", type=_int_at_least(1), default=16, help="tiles per forward pass")
    parser.add_argument("--tile-size", type=_int_at_least(8), default=None,
                        help="square tiles of this side instead of the model's training size (needed for "
                             "models that do not record it)")
    parser.add_argument("--threads", type=int, default=None)


def _add_export(commands) -> None:
    parser = commands.add_parser("export", help="write a trained model as safetensors weights and a JSON model card")
    parser.set_defaults(func=_export)
    parser.add_argument("--model", required=True, type=Path, help="the model.pt (run.json, test_metrics.json "
                                                                  "beside it go into the card)")
    parser.add_argument("--out", required=True, type=Path,
                        help="the folder to create (an existing one only if empty or an earlier export)")


def _add_trivial(commands) -> None:
    parser = commands.add_parser("evaluate-trivial", help="score the trivial one-class-per-image reference")
    parser.set_defaults(func=_evaluate_trivial)
    _add_dataset_argument(parser)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    _add_validated_argument(parser)


def _add_doctor(commands) -> None:
    parser = commands.add_parser("doctor", help="check this machine against a workflow config before running its grid")
    parser.set_defaults(func=_doctor)
    parser.add_argument("--configfile", type=Path, default=Path("config/config.yaml"))


def _add_plan(commands) -> None:
    parser = commands.add_parser("plan", help="GPU jobs and estimated GPU-hours of a workflow config's grid")
    parser.set_defaults(func=_plan)
    parser.add_argument("--configfile", required=True, type=Path,
                        help="workflow config (YAML) with a 'throughput' block")
    parser.add_argument("--floor", action="store_true",
                        help="per method, FLOPs and bytes per image counted from the built model and the grid's "
                             "GPU-hours at the floor of the config's floor.gpu beside the estimate (counts what "
                             "floor.costs_file lacks first: minutes on a CPU)")


def _add_calibrate(commands) -> None:
    parser = commands.add_parser("calibrate", help="measure each configured method's images/s and peak memory on "
                                                   "this device: the throughput file `plan` reads")
    parser.set_defaults(func=_calibrate)
    parser.add_argument("--configfile", required=True, type=Path, help="workflow config (YAML)")
    parser.add_argument("--out", type=Path, default=None,
                        help="throughput file (JSON) to write; default <resources_dir>/"
                             + layout.THROUGHPUT.format(device_type="<device type>"))
    parser.add_argument("--device", type=_device, default=None,
                        help="cpu, cuda, cuda:N or auto; default the config's train.device")
    parser.add_argument("--steps", type=_int_at_least(1), default=5, help="timed training steps and evaluation batches")
    parser.add_argument("--warmup-steps", type=_int_at_least(0), default=2, help="untimed steps before them")
    parser.add_argument("--methods", nargs="+", type=_method, default=None, help="default: every configured method")
    parser.add_argument("--random-init", action="store_true",
                        help="build the models with every weights file (pretrained, segmenter_pretrained) set to "
                             "none: speed does not depend on the weights' values")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch; default threads_per_job")
    parser.add_argument("--scan", choices=SCAN_IMPLEMENTATIONS, default=None,
                        help="selective scan instead of the config's train.scan (fused runs on CUDA only)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="bf16 autocast or fp32 instead of the config's train.precision")


def _add_grid_arguments(parser, several_experiment_dirs: bool = False) -> None:
    parser.add_argument("--configfile", type=Path, default=None,
                        help="workflow config (YAML) to take the experiment folder, datasets, methods and seeds from")
    if several_experiment_dirs:
        parser.add_argument("--experiment-dir", type=Path, nargs="+", default=None,
                            help="results/<experiment>, holding runs/; several (a grid split across machines) are "
                                 "combined: a run in two of them must have the same results in both")
    else:
        parser.add_argument("--experiment-dir", type=Path, default=None,
                            help="results/<experiment>, holding runs/ and benchmarks/")
    parser.add_argument("--datasets", nargs="+", type=_dataset_name, default=None)
    parser.add_argument("--methods", nargs="+", type=_method, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="the configured seeds")
    parser.add_argument("--paper", type=Path, default=layout.REPO / "config" / "paper_results.yaml",
                        help="the paper's reported values (config/paper_results.yaml)")
    parser.add_argument("--out-dir", required=True, type=Path)


def _add_tables(commands) -> None:
    parser = commands.add_parser("tables", help="Tables 1 and 2, per-class IoU, 5-class protocol and paired "
                                                "statistics from whatever runs finished")
    parser.set_defaults(func=_tables)
    _add_grid_arguments(parser, several_experiment_dirs=True)
    # Unset: the config's `report` settings (config/README.md), else the schema's defaults.
    parser.add_argument("--n-resamples", type=int, default=None, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=None)
    parser.add_argument("--reference-method", default=None,
                        help="the method the paired statistics compare with every other (report.reference_method)")


def _add_figures(commands) -> None:
    parser = commands.add_parser("figures", help="qualitative grid, seed spread, ablation, training curves and "
                                                 "compute cost (PNG + PDF) from whatever runs finished")
    parser.set_defaults(func=_figures)
    _add_grid_arguments(parser)
    parser.add_argument("--data-root", nargs="+", default=[], metavar="DATASET=FOLDER",
                        help="dataset folders for the qualitative grid (taken from --configfile when given)")
    parser.add_argument("--n-images", type=int, default=4, help="test images in the qualitative grid")


#: What ``compare --fail-on`` can fail on (:func:`pathmamba.reporting.compare.failed`): a verdict ``differs``, or anything
#: short of ``identical``.
FAIL_ON = ("differs", "not-identical")


def _add_compare(commands) -> None:
    parser = commands.add_parser("compare", help="do two results agree? Per dataset, method and metric: both means, "
                                                 "the difference, 95%% intervals and a verdict (identical, within "
                                                 "seed noise, differs)")
    parser.set_defaults(func=_compare)
    parser.add_argument("a", type=Path, metavar="A", help="an experiment folder (results/<experiment>)")
    parser.add_argument("b", type=Path, metavar="B",
                        help="another experiment folder of the same configuration (another machine), a README with a "
                             "results section (README.md) or the paper's values (config/paper_results.yaml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the comparison to this .md or .csv file (new, or one compare wrote)")
    parser.add_argument("--fail-on", choices=FAIL_ON, default=None,
                        help="exit 1 when a row differs, or when any is not identical (default: exit 0 either way)")
    parser.add_argument("--accept", nargs="+", default=[], metavar="KEY",
                        help="configuration keys (as the refusal names them) allowed to differ between A and B")
    parser.add_argument("--n-resamples", type=_int_at_least(1), default=10000, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0)


def _add_readme(commands) -> None:
    parser = commands.add_parser("readme", help="splice a markdown table into README.md between the "
                                                "<!-- results:start --> and <!-- results:end --> markers")
    parser.set_defaults(func=_readme)
    parser.add_argument("--table", required=True, type=Path,
                        help=f"e.g. results/demo/{layout.TABLES}/{layout.table_file(layout.TABLE1, 'md')}")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 with a diff when the README's results differ from the table")


def _add_rehearse(commands) -> None:
    parser = commands.add_parser("rehearse", help="run the paper config on generated data and random weights at "
                                                  "the paper's model sizes, in a folder of its own, and check "
                                                  "the run (docs/rehearsal.md)")
    parser.set_defaults(func=_rehearse)
    parser.add_argument("--folder", type=Path, default=Path("results/rehearsal"),
                        help="the rehearsal's folder: new, or one an earlier rehearsal created (it resumes)")
    parser.add_argument("--paper", type=Path, default=None, help="the paper config; default config/config.yaml")
    parser.add_argument("--overlay", type=Path, default=None,
                        help="the overlay with what this machine changes; default config/rehearsal.yaml")
    parser.add_argument("--cores", type=_int_at_least(1), default=None, help="snakemake --cores; default all")


def _add_fetch_weights(commands) -> None:
    parser = commands.add_parser("fetch-weights", help="download a backbone's ImageNet weights once, for offline jobs")
    parser.set_defaults(func=_fetch_weights)
    parser.add_argument("--backbone", required=True, choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--out", required=True, type=Path, help="the weights file to write")
    parser.add_argument("--url", default=None,
                        help="a mirror (http(s):// or file://) of torchvision's file; default torchvision's URL")


def _add_dataset_commands(commands) -> None:
    parser = commands.add_parser("download-dataset", help="download a real dataset's published files (resumable)")
    parser.set_defaults(func=_download_dataset)
    _add_dataset_argument(parser)
    parser.add_argument("--folder", required=True, type=Path, help="download folder (kept: partial files resume)")
    parser.add_argument("--record", required=True, type=Path, help="JSON file listing the downloaded files")
    parser.add_argument("--url", default="", help="one archive at this URL instead of the Google Drive folder")

    parser = commands.add_parser("prepare-dataset", help="verify checksums, extract and normalise a dataset")
    parser.set_defaults(func=_prepare_dataset)
    _add_dataset_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="the canonical dataset folder to create")
    parser.add_argument("--lock", required=True, type=Path,
                        help="lock file of the sources' SHA-256 sums: checked if present, else written")
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--archive", nargs="+", type=Path, help="zip archive(s) or one extracted folder")
    sources.add_argument("--downloaded", type=Path, help="the record written by download-dataset")

    parser = commands.add_parser("validate-dataset", help="check every file of a dataset; fail with a summary")
    parser.set_defaults(func=_validate_dataset)
    _add_dataset_argument(parser)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="validation report (JSON), written when valid")
    parser.add_argument("--image-size", type=int, default=224, help="expected patch side in pixels")
    parser.add_argument("--counts", choices=["error", "warn"], default="error",
                        help="a split count other than the published one: a problem or a warning")
    parser.add_argument("--workers", type=int, default=1, help="decoding threads")


def _claim_gpu(args) -> None:
    """A job that may use a GPU claims one of the workflow's pool (pathmamba/core/gpus.py) before CUDA starts.
    A device pinned to an index (``cuda:1``) is the user's choice and claims nothing."""
    from pathmamba.core.gpus import claim_workflow_gpu

    device = args.settings.get("device", "auto") if args.command == "train" else args.device
    if device in ("auto", "cuda") and (slot := claim_workflow_gpu()) is not None:
        logging.getLogger("pathmamba").info("claimed GPU %s of the pool %s", slot.gpu, ",".join(slot.pool))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathmamba", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (a bad file or argument) too")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_make_demo_data, _add_dataset_commands, _add_train, _add_pseudo_masks, _add_evaluate,
                _add_trivial, _add_doctor, _add_plan, _add_calibrate, _add_tables, _add_figures, _add_compare,
                _add_readme, _add_fetch_weights, _add_rehearse, _add_predict, _add_export):
        add(commands)
    return parser


#: Exit status of an expected error (a bad file or argument), the one argparse uses for a bad argument.
EXIT_INPUT = 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can fix, each raised with a message naming the file or argument at fault."""
    from pathmamba.core.download import DownloadFailed
    from pathmamba.core.errors import (
        DeviceUnavailable,
        DiskFull,
        FileSafetyError,
        InputError,
        TrainingDiverged,
    )
    from pathmamba.data.acquire import ArchiveError, ChecksumMismatch
    from pathmamba.data.readers import DatasetLayoutError, LabelError, MaskError
    from pathmamba.data.validate import DatasetInvalid
    from pathmamba.engine.config import ConfigError

    return (InputError, FileSafetyError, ConfigError, DatasetLayoutError, LabelError, MaskError, DatasetInvalid,
            ArchiveError, ChecksumMismatch, DownloadFailed, TrainingDiverged, DeviceUnavailable, DiskFull,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised where the command is, so that its clean-up (``finally``) runs and
    removes its temporary folders, as on Ctrl-C. ``train`` notes SIGTERM itself while it trains."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: A stop signal that arrived while a module was being imported, raised once the import is done.
_deferred_stop: list[int] = []


def _terminate(signum, frame) -> None:
    import signal

    # Raised inside an import, the exception may be swallowed by whatever imports (a library's bare
    # `except:` around an optional import): the command would go on as if never stopped. Retried every
    # 10 ms (SIGALRM) until no import is under way.
    if _importing(frame):
        _deferred_stop[:] = [signum]
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    raise Terminated(signum)


def _retry_deferred_stop(_signum, frame) -> None:
    if _deferred_stop:
        _terminate(_deferred_stop[0], frame)


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def _stopping_cleanly():
    """SIGTERM and SIGHUP raise :class:`Terminated` (main thread only) while the command runs, once no
    import is under way; a SIGINT raises KeyboardInterrupt already."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signal.SIGTERM: _terminate, signal.SIGHUP: _terminate, signal.SIGALRM: _retry_deferred_stop}
    before = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _deferred_stop.clear()
        for signum, handler in before.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected error ends it with its message on stderr and exit status 2, without a
    traceback (``--debug`` keeps the traceback); anything else is a bug and keeps its traceback."""
    import signal

    args = build_parser().parse_args(argv)
    try:
        with _stopping_cleanly():
            return _main(args)
    except expected_errors() as error:
        if args.debug:
            raise
        print(f"pathmamba {args.command}: {error}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT) from None
    except OSError as error:
        from pathmamba.core.errors import NO_ROOM, disk_full

        # A full disk met by a writer other than this tool's own (PIL, zipfile, ...): named all the same, by
        # the file if the error has it (a write to an open file does not), else by the command's output.
        written = error.filename or getattr(args, "out", None) or getattr(args, "out_dir", None)
        if args.debug or error.errno not in NO_ROOM or not written:
            raise
        print(f"pathmamba {args.command}: {disk_full(Path(written), None)}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT) from None
    except (Terminated, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
        print(f"pathmamba {args.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        raise SystemExit(128 + signum) from None


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if getattr(args, "threads", None):
        import torch  # only the commands with --threads run torch

        torch.set_num_threads(args.threads)
    if getattr(args, "validated", None):
        from pathmamba.data.validate import check_validated

        check_validated(args.validated, args.data_root)
    if args.command in ("train", "evaluate", "pseudo-masks"):
        _claim_gpu(args)
    return args.func(args) or 0


# One function per command: its arguments into one call of the module that does the work.


def _make_demo_data(args) -> None:
    from pathmamba.data.synthetic import make_synthetic_dataset

    counts = make_synthetic_dataset(args.dataset, args.out, args.n_train, args.n_val, args.n_test, size=args.size,
                                    seed=args.seed)
    logging.getLogger("pathmamba").info("wrote %s to %s: %s", args.dataset, args.out, counts)


def _download_dataset(args) -> None:
    from pathmamba.data.acquire import download_with_record
    from pathmamba.data.specs import get_dataset_spec

    download_with_record(get_dataset_spec(args.dataset), args.folder, args.record, args.url or None)


def _prepare_dataset(args) -> None:
    from pathmamba.data.acquire import prepare_dataset, prepare_downloaded
    from pathmamba.data.specs import get_dataset_spec

    spec = get_dataset_spec(args.dataset)
    if args.downloaded:
        manifest = prepare_downloaded(spec, args.downloaded, args.out, args.lock)
    else:
        manifest = prepare_dataset(spec, args.archive, args.out, args.lock)
    logging.getLogger("pathmamba.data").info("prepared %s in %s: %s", spec.name, args.out, manifest["counts"])


def _validate_dataset(args) -> None:
    from pathmamba.data.specs import get_dataset_spec
    from pathmamba.data.validate import validate_and_write

    report = validate_and_write(args.data_root, get_dataset_spec(args.dataset), args.out, args.image_size,
                                args.counts, args.workers)
    print(report.summary(), file=sys.stderr)


def _train(args) -> int | None:
    from pathmamba.core.errors import InputError
    from pathmamba.engine.train import TrainingInterrupted, TrainSettings, train

    try:
        settings = TrainSettings(**args.settings)
    except TypeError as error:
        raise InputError(f"--settings: {error}; valid keys: {', '.join(TrainSettings.__dataclass_fields__)}") from None
    try:
        train(args.method, args.dataset, args.data_root, args.out, args.checkpoint_dir, args.seed, args.hparams,
              settings, args.stage, args.stage1_model, args.pseudo_masks)
    except TrainingInterrupted as interrupted:
        return 128 + interrupted.signum  # the shell's convention for "killed by this signal"
    return None


def _pseudo_masks(args) -> None:
    from pathmamba.engine.pseudo_masks import write_pseudo_masks

    write_pseudo_masks(args.model, args.data_root, args.out, args.device, args.batch_size, scan=args.scan,
                       precision=args.precision)


def _evaluate(args) -> None:
    from pathmamba.engine.evaluate import evaluate

    evaluate(args.model, args.data_root, args.out, args.masks_dir, args.n_masks, args.tta, args.device,
             args.batch_size, scan=args.scan, precision=args.precision)


def _evaluate_trivial(args) -> None:
    from pathmamba.engine.evaluate import evaluate_trivial

    evaluate_trivial(args.dataset, args.data_root, args.out)


def _predict(args) -> None:
    from pathmamba.engine.predict import predict

    predict(args.model, args.input, args.out, args.device, args.batch_size, args.tile_size, scan=args.scan,
            precision=args.precision)


def _export(args) -> None:
    from pathmamba.engine.export import export_model

    export_model(args.model, args.out)


def _fetch_weights(args) -> None:
    from pathmamba.models.backbones import fetch_imagenet_weights

    fetch_imagenet_weights(args.backbone, args.out, args.url)


@contextmanager
def _config_named(configfile: Path):
    """A config problem as a :class:`pathmamba.engine.config.ConfigError` that names ``configfile``."""
    from pathmamba.engine.config import ConfigError, ConfigFileError

    try:
        yield
    except ConfigFileError:
        raise  # names the file already, with the line and column
    except (ConfigError, KeyError) as error:
        raise ConfigError(f"{configfile}: {error.args[0]}") from None


def _doctor(args) -> int:
    from pathmamba.operations.doctor import FAIL, format_checks, run_checks
    from pathmamba.operations.plan import load_workflow_config

    with _config_named(args.configfile):
        checks = run_checks(load_workflow_config(args.configfile))
    print(format_checks(checks))
    return 1 if any(check.status == FAIL for check in checks) else 0


def _plan(args) -> None:
    from pathmamba.engine.config import check_methods, grid_methods
    from pathmamba.operations.plan import format_plan, gpu_jobs, load_workflow_config

    with _config_named(args.configfile):
        config = load_workflow_config(args.configfile)
        check_methods(config, grid_methods(config))
        if args.floor:
            from pathmamba.operations.costs import update_costs
            from pathmamba.operations.plan import format_floor

            counted = update_costs(config)
            if counted:
                logging.getLogger("pathmamba").info("counted %s into %s", ", ".join(counted),
                                                    config["floor"]["costs_file"])
            print(format_floor(config))
        else:
            print(format_plan(gpu_jobs(config)))


def _calibrate(args) -> None:
    from pathmamba.operations.calibrate import format_calibration, write_calibration

    with _config_named(args.configfile):
        out, record = write_calibration(args.configfile, args.out, device=args.device, steps=args.steps,
                                        warmup_steps=args.warmup_steps, methods=args.methods,
                                        random_init=args.random_init, threads=args.threads, scan=args.scan,
                                        precision=args.precision)
    print(format_calibration(record))
    logging.getLogger("pathmamba").info("wrote %s", out)


def _selection(args):
    from pathmamba.reporting.results import select_runs

    experiment_dirs = [args.experiment_dir] if isinstance(args.experiment_dir, Path) else args.experiment_dir
    return select_runs(args.configfile, experiment_dirs, args.datasets, args.methods, args.seeds,
                       getattr(args, "data_root", []))


def _tables(args) -> None:
    from pathmamba.engine.config import report_settings
    from pathmamba.reporting.tables import write_tables

    selection = _selection(args)
    with _config_named(args.configfile):
        report = report_settings(args.configfile)
    given = {"n_resamples": args.n_resamples, "bootstrap_seed": args.bootstrap_seed,
             "reference_method": args.reference_method}
    report.update({key: value for key, value in given.items() if value is not None})
    write_tables(selection.experiment_dirs, selection.grid, args.paper, args.out_dir, report["n_resamples"],
                 report["bootstrap_seed"], reference_method=report["reference_method"])


def _figures(args) -> None:
    from pathmamba.reporting.plots import write_figures
    from pathmamba.reporting.results import load_paper_results

    selection = _selection(args)
    grid = selection.grid
    write_figures(selection.experiment_dirs[0], grid.datasets, grid.methods, grid.seeds, selection.data_roots,
                  load_paper_results(args.paper), args.out_dir, args.n_images)


def _compare(args) -> int:
    from pathmamba.reporting.compare import compare, failed, markdown, write_comparison

    comparison = compare(args.a, args.b, args.accept, args.n_resamples, args.bootstrap_seed)
    if args.out:
        write_comparison(args.out, comparison)
    print(markdown(comparison), end="")
    return 1 if failed(comparison, args.fail_on) else 0


def _readme(args) -> int:
    from pathmamba.reporting.readme import splice_readme, unpinned_runs

    diff = splice_readme(args.readme, args.table, check=args.check)
    if diff:
        print("\n".join(diff))
        print(f"{args.readme}: its results differ from {args.table}; `make readme` splices them in")
        experiment_dir = layout.experiment_dir_of_table(args.table)
        unpinned = unpinned_runs(experiment_dir)
        if unpinned:
            print(f"{len(unpinned)} runs of {experiment_dir} were not pinned to AVX2 (e.g. {unpinned[0]}): the "
                  "README's numbers are bitwise only for pinned runs (docs/reproducibility.md); compare the means "
                  f"statistically with `python -m pathmamba compare {experiment_dir} {args.readme}`")
        return 1
    return 0


def _rehearse(args) -> int:
    from pathmamba.core.errors import InputError
    from pathmamba.operations.rehearsal import OVERLAY, PAPER_CONFIG, RehearsalError, rehearse

    try:
        return rehearse(args.folder, args.paper or PAPER_CONFIG, args.overlay or OVERLAY, args.cores)
    except RehearsalError as error:
        raise InputError(str(error)) from None
