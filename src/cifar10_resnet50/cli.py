"""The ``cifar10-resnet50`` command line.

The parsers and ``main``; the command handlers are in :mod:`.commands`. Only these two
modules print. Heavy imports (torch) happen inside the handlers, so ``--help`` answers in a
fraction of a second.

Exit codes: 0 success; 1 unexpected failure (a bug: please report it with ``--debug``);
2 bad input (flags, files, data, checkpoints; the message says how to fix it);
130 interrupted (training saved ``last`` first: ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, NoReturn

from . import __version__
from .commands import HANDLERS, TRAIN_FLAGS
from .config import AugmentConfig, DataConfig
from .declare import flags
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, first_line
from .evaluation.settings import CompareOptions, EvaluateOptions
from .options import DataCommandOptions, LrFindOptions, ShowOptions
from .serving.settings import ExportOptions, ModelOptions, PredictOptions, ServeConfig

S = argparse.SUPPRESS  # only flags the user gives reach the config; defaults live in config.py
# Every flag below comes from a declaration (config.setting) beside its default: training's
# in config, evaluate's and compare's in evaluation.settings, the model commands' in
# serving.settings. Only positional arguments and lr-find's sweep are declared here.


def _number(kind: type, low: float, high: float | None = None, *, above: bool = False):
    """An argparse ``type`` that parses ``kind`` and checks ``low`` ≤ value (< if ``above``)
    ≤ ``high``, so a bad value is a one-line usage error, not a traceback deep inside."""
    noun = "an integer" if kind is int else "a number"
    bound = f"> {low:g}" if above else f"≥ {low:g}"
    rule = f"{noun} {bound}" + (f" and ≤ {high:g}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value < low or (above and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {rule}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)

# (flag, config key, argparse keywords), declared once beside each default in config.py.
# What a range test of a few hundred steps has no use for: it plans no run, keeps no
# checkpoint and trains at the model's own resolution.
NOT_FOR_LR_FIND = {
    "train.budget",
    "train.progressive",
    "train.checkpoint_every",
    "train.steps_per_epoch",
    "train.tensorboard",
    "train.tracker",
}


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: ``--epoch 3`` must not silently mean ``--epochs``
    (and a future ``--epoch-*`` flag would change its meaning). Subparsers inherit it."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line, like every other error of ours, instead of the whole usage first (23
        lines for `train` before the useful "did you mean"); --help is named for the rest."""
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    import difflib

    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and (close := difflib.get_close_matches(flag, known, n=1)):
            hints.append(close[0])
    return f"; did you mean {' / '.join(hints)}?" if hints else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, and answer an unknown flag with the closest known one of its command."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        sub = _SUBPARSERS.get(name, parser)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(sub, unknown)}")
    return args


_SUBPARSERS: dict[str, argparse.ArgumentParser] = {}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="cifar10-resnet50",
        description="Fine-tune an ImageNet ResNet-50 on CIFAR-10 or a folder of your images; "
        "evaluate, predict, export, serve.",
        epilog="Exit codes: 0 ok, 1 unexpected failure, 2 bad input, 130 interrupted.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _data_parsers(sub)
    _train_parsers(sub)
    _evaluate_parser(sub)
    _predict_parser(sub)
    _export_parser(sub)
    _serve_parser(sub)
    _compare_parser(sub)
    return p


def _compare_parser(sub: Any) -> None:
    c = _SUBPARSERS["compare"] = sub.add_parser(
        "compare",
        help="runs or model files side by side: accuracy, corruptions, calibration, size, speed",
        description="Compare runs, strategies or exports by evidence: test accuracy with 95% "
        "intervals, CIFAR-10-C accuracy, ECE, file size and CPU inference speed.",
    )
    c.add_argument("models", nargs="+", metavar="RUN_OR_MODEL", help="run folders or model files")
    _add_flags(c, CompareOptions)


def _data_parsers(sub: Any) -> None:
    d = sub.add_parser(
        "data",
        help="download or verify CIFAR-10; describe or show any data source",
        description="Get and check CIFAR-10 (official archive or a local copy); describe or "
        "show CIFAR-10 or a folder of your images (--data folder:PATH or csv:FILE).",
    )
    actions = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("download", "fetch the official archive (md5-checked), extract it safely, verify it"),
        ("verify", "check a copy: official md5s, else its full structure"),
        ("info", "load the set (through the tensor cache) and print its shapes"),
        ("show", "save a grid of augmented training images as the model sees them"),
    ):
        a = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        # Every action takes these (info and show decode a folder with a bar; verify hashes).
        _add_flags(a, DataConfig, prefix="data.", only={"data.data_dir"})
        _add_flags(a, DataCommandOptions)
        if name in ("info", "show"):  # declared as train declares them, checked alike
            _add_flags(a, DataConfig, prefix="data.", only={"data.source", "data.store_size"})
        if name == "show":
            _add_flags(a, ShowOptions)
            _add_flags(a, AugmentConfig, prefix="augment.")
        _SUBPARSERS[f"data {name}"] = a


def _train_parsers(sub: Any) -> None:
    t = _SUBPARSERS["train"] = sub.add_parser(
        "train",
        help="fine-tune ResNet-50 on CIFAR-10 or your own images (--data folder:PATH or csv:FILE)",
        description="Fine-tune ResNet-50 on CIFAR-10 or a folder of your images, then evaluate "
        "the best checkpoint on the test set. "
        "Defaults: see src/cifar10_resnet50/config.py and the README.",
    )
    t.add_argument(
        "--config",
        metavar="FILE",
        help="TOML or JSON file with [data] [model] [optim] [augment] [train] sections; flags override it",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt, with its saved settings",
    )
    _add_train_flags(t)

    lf = _SUBPARSERS["lr-find"] = sub.add_parser(
        "lr-find",
        help="learning-rate range test: plot loss against lr, suggest --lr",
        description="Smith's range test (fastai's lr_find) on the run the train flags describe: "
        "a short sweep with the lr growing exponentially, a plot of loss against lr "
        "(RUN_DIR/lr_find/ or runs/lr_find/) and a suggested --lr. Nothing is saved as a run.",
    )
    lf.add_argument(
        "--config", metavar="FILE", help="TOML or JSON config file, as for train; flags override it"
    )
    _add_flags(lf, LrFindOptions)
    _add_train_flags(lf, leave_out=NOT_FOR_LR_FIND)


def _evaluate_parser(sub: Any) -> None:
    e = _SUBPARSERS["evaluate"] = sub.add_parser(
        "evaluate",
        help="test-set accuracy with intervals, calibration, confusion matrix, corruptions",
        description="Evaluate a model file (checkpoint, TorchScript or ONNX export) on the "
        "test set of the data it was trained on; --corruptions adds the CIFAR-10-C sweep.",
    )
    e.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="a checkpoint (runs/X/best.pt) or an export (.onnx, fp32 or int8; .torchscript.pt)",
    )
    _add_flags(e, EvaluateOptions)


def _predict_parser(sub: Any) -> None:
    pr = _SUBPARSERS["predict"] = sub.add_parser(
        "predict",
        help="top-k classes for image files, folders or globs",
        description="Predict the model's classes for your images (any format Pillow reads). "
        "Images not at the model's input size are centre-cropped to a square and resized to "
        "it (the policy its training images went through). "
        "Results stream as batches finish; an --output file appears when the run completes "
        "(FILE.partial until then: --resume continues it after a kill). "
        "Exit codes: 0 all predicted, 2 some files rejected (one line each on stderr) "
        "or bad arguments, 1 other failure.",
    )
    pr.add_argument(
        "model",
        metavar="MODEL",
        help="checkpoint (.pt), TorchScript (.torchscript.pt) or ONNX (.onnx)",
    )
    pr.add_argument(
        "paths", metavar="PATH", nargs="+", help="image files, folders (recursive) or glob patterns"
    )
    _add_flags(pr, PredictOptions)
    _add_flags(pr, ModelOptions)


def _export_parser(sub: Any) -> None:
    x = _SUBPARSERS["export"] = sub.add_parser(
        "export",
        help="TorchScript or ONNX export with a parity check",
        description="Export a checkpoint with preprocessing and softmax inside (input: uint8 "
        "[B,3,S,S] at the model's input size S, dynamic batch; output: probabilities), then "
        "compare it with the eager model on test images of its data. Exit 1 if the parity "
        "check fails.",
    )
    x.add_argument("checkpoint", metavar="CHECKPOINT")
    _add_flags(x, ExportOptions)


def _serve_parser(sub: Any) -> None:
    sv = _SUBPARSERS["serve"] = sub.add_parser(
        "serve",
        help="HTTP API and web page (FastAPI + uvicorn)",
        description="Serve a model over HTTP: POST /predict, GET /healthz /readyz /metrics "
        "/labels, a web page at / and the API docs at /docs.",
    )
    sv.add_argument("model", metavar="MODEL", help="checkpoint (.pt), TorchScript or ONNX file")
    _add_flags(sv, ServeConfig)
    _add_flags(sv, ModelOptions)


def _add_flags(
    parser: argparse.ArgumentParser,
    kind: type,
    *,
    prefix: str = "",
    only: set[str] | None = None,
) -> None:
    """The flags ``kind`` declares (``config.flags``), with their declared defaults."""
    declared = [d for d in flags(kind, prefix) if only is None or d[1] in only]
    _add_declared(parser, declared, kind(), prefix)


def _add_declared(
    parser: argparse.ArgumentParser,
    declared: list[tuple[str, str, dict[str, Any]]],
    defaults: Any | None,
    prefix: str = "",
) -> None:
    """Declared flags with their range checks; ``defaults`` None: only the flags the user
    gives reach ``args`` (training's, which a config file may set too)."""
    for flag, key, kwargs in declared:
        kwargs = dict(kwargs)
        low, high, above = (
            kwargs.pop("low", None),
            kwargs.pop("high", None),
            kwargs.pop("above", None),
        )
        if low is not None or above is not None:
            bound = above if above is not None else low
            kwargs["type"] = _number(kwargs["type"], bound, high, above=above is not None)
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", flag[2:].upper().replace("-", "_"))
        default = S if defaults is None else getattr(defaults, key.removeprefix(prefix))
        parser.add_argument(flag, dest=key, default=default, **kwargs)


def _add_train_flags(parser: argparse.ArgumentParser, leave_out: set[str] = frozenset()) -> None:
    _add_declared(parser, [d for d in TRAIN_FLAGS if d[1] not in leave_out], None)


def _path_problem(e: OSError) -> str:
    """An OSError on a path, said so the user can fix it. A missing path whose parent folder
    exists is a folder that cannot hold new files (/proc, /sys: "No such file or directory"
    there would send the user looking for a path that is plainly there)."""
    import errno
    from pathlib import Path

    path = Path(e.filename)
    if e.errno == errno.ENOENT and path.parent.is_dir() and not path.exists():
        return (
            f"{path}: cannot be created in {path.parent} (a system folder such as /proc takes "
            "no new files); choose a folder of yours"
        )
    return f"{e.filename}: {e.strerror or e}; check the path, its permissions and free disk space"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import os

    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun, rank 0 speaks for the job
    logging.basicConfig(
        level=logging.WARNING if args.quiet or rank > 0 else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    handler = HANDLERS[args.command]
    try:
        return handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and isinstance(e, RuntimeError):
            # A collective failed: another process of the torchrun job died or vanished.
            print(
                f"error: rank {rank}: lost contact with the other processes of this torchrun "
                f"job ({type(e).__name__}: {first_line(e)}); the first failing rank's message "
                "above says why",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        if isinstance(e, OSError) and e.filename is not None:
            # A path that cannot be read or written (missing folder, permissions, full disk)
            # is the user's to fix, and the file name says where.
            print(f"error: {_path_problem(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(
            f"unexpected error: {type(e).__name__}: {e} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
