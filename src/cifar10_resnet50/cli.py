"""The ``cifar10-resnet50`` command line.

Only this module prints. Heavy imports (torch) happen inside the command handlers, so
``--help`` answers in a fraction of a second.

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
from .config import PRECISIONS, Config, ServeConfig, serve_flags, train_flags
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, UserError, first_line

S = argparse.SUPPRESS  # only flags the user gives reach the config; defaults live in config.py


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
TRAIN_FLAGS = train_flags()
# What a range test of a few hundred steps has no use for: it plans no run, keeps no
# checkpoint and trains at the model's own resolution.
NOT_FOR_LR_FIND = {
    "train.budget",
    "train.progressive",
    "train.checkpoint_every",
    "train.steps_per_epoch",
    "train.tensorboard",
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
    c.add_argument(
        "--out",
        metavar="DIR",
        default="compare",
        help="compare.json/.png go here (default compare)",
    )
    c.add_argument(
        "--corruption-images",
        type=POSITIVE_INT,
        default=500,
        metavar="N",
        help="stratified test images per corrupted set (default 500)",
    )
    c.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder holding cifar-10-batches-py/ (else $CIFAR10_DATA_DIR, else the user cache)",
    )
    _torchscript_flag(c)


def _data_parsers(sub: Any) -> None:
    d = sub.add_parser(
        "data",
        help="download or verify CIFAR-10; describe or show any data source",
        description="Get and check CIFAR-10 (official archive or a local copy); describe or "
        "show CIFAR-10 or a folder of your images (--data folder:PATH).",
    )
    actions = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("download", "fetch the official archive (md5-checked), extract it safely, verify it"),
        ("verify", "check a copy: official md5s, else its full structure"),
        ("info", "load the set (through the tensor cache) and print its shapes"),
        ("show", "save a grid of augmented training images as the model sees them"),
    ):
        a = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        a.add_argument(
            "--data-dir",
            metavar="DIR",
            help="folder holding cifar-10-batches-py/ (else $CIFAR10_DATA_DIR, else the user cache)",
        )
        # Every action takes it (info and show decode a folder with a bar; verify hashes files).
        a.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name in ("info", "show"):
            a.add_argument(
                "--data",
                default="cifar10",
                metavar="SOURCE",
                help="cifar10 (default) or folder:PATH; a folder's report lists what is left out",
            )
            a.add_argument(
                "--store-size",
                type=_number(int, 16, 1024),
                metavar="PX",
                help="folder: stored size (default: the device's default training resolution)",
            )
        if name == "show":
            a.add_argument(
                "--out",
                metavar="FILE",
                default="batch.png",
                help="PNG to write (default batch.png)",
            )
            a.add_argument("--n", type=_number(int, 1, 256), default=32, help="images (default 32)")
            a.add_argument("--seed", type=_number(int, 0), default=0, help="default 0")
            a.add_argument(
                "--crop-padding",
                type=_number(int, 0, 16),
                default=4,
                metavar="PX",
                help="default 4",
            )
            a.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
            a.add_argument(
                "--mixup", type=_number(float, 0), default=0.0, metavar="ALPHA", help="default 0"
            )
            a.add_argument(
                "--cutmix", type=_number(float, 0), default=0.0, metavar="ALPHA", help="default 0"
            )
        _SUBPARSERS[f"data {name}"] = a


def _train_parsers(sub: Any) -> None:
    t = _SUBPARSERS["train"] = sub.add_parser(
        "train",
        help="fine-tune ResNet-50 on CIFAR-10 or a folder of images (--data folder:PATH)",
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
    lf.add_argument(
        "--steps", type=_number(int, 2), default=100, help="sweep length in steps (default 100)"
    )
    lf.add_argument(
        "--start-lr", type=_number(float, 0, above=True), default=1e-7, help="default 1e-7"
    )
    lf.add_argument("--end-lr", type=_number(float, 0, above=True), default=10.0, help="default 10")
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
    e.add_argument(
        "--data",
        metavar="SOURCE",
        help="cifar10 or folder:PATH (default: the data the model was trained on, as its "
        "metadata records)",
    )
    e.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder holding cifar-10-batches-py/ (else $CIFAR10_DATA_DIR, else the user cache)",
    )
    e.add_argument(
        "--out",
        metavar="DIR",
        help="where metrics.json, confusion.{json,png}, top_losses.png, reliability.png (and "
        "robustness.{json,png}) go (default: MODEL's folder/eval)",
    )
    e.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    e.add_argument(
        "--corruptions",
        action="store_true",
        help="also the CIFAR-10-C sweep: 15 corruptions × 5 severities, generated on the fly",
    )
    e.add_argument(
        "--corruption-images",
        type=POSITIVE_INT,
        metavar="N",
        help="stratified test images for the sweep (default: 2000 on a CPU, all 10000 on a GPU)",
    )
    e.add_argument("--seed", type=int, default=0, help="corruptions' randomness (default 0)")
    _torchscript_flag(e)
    e.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default auto (cuda if available)",
    )
    e.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="default auto: bf16 where fast (as training); fp32 for bit-exact comparisons",
    )
    e.add_argument("--batch-size", type=POSITIVE_INT, default=500, help="default 500")


def _predict_parser(sub: Any) -> None:
    pr = _SUBPARSERS["predict"] = sub.add_parser(
        "predict",
        help="top-k classes for image files, folders or globs",
        description="Predict the model's classes for your images (any format Pillow reads). "
        "Images not at the model's input size are centre-cropped to a square and resized to "
        "it (the policy its training images went through). "
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
    pr.add_argument(
        "--top-k",
        type=POSITIVE_INT,
        default=3,
        help="default 3; more than the model's classes shows them all",
    )
    pr.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="default table"
    )
    pr.add_argument(
        "--output", metavar="FILE", help="write results here instead of stdout ('-': stdout)"
    )
    pr.add_argument(
        "--batch-size", type=POSITIVE_INT, default=64, help="images per model call (default 64)"
    )
    _add_model_flags(pr)


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
    x.add_argument(
        "--format",
        choices=("torchscript", "onnx"),
        required=True,
        help="onnx (runs anywhere ONNX Runtime does; --int8 for speed) or torchscript",
    )
    x.add_argument(
        "--int8",
        action="store_true",
        help="ONNX Runtime static int8 quantization, calibrated on training images",
    )
    x.add_argument(
        "--out",
        metavar="FILE",
        help="default: beside the checkpoint (.torchscript.pt, .onnx, .int8.onnx)",
    )
    x.add_argument(
        "--data-dir",
        metavar="DIR",
        help="CIFAR-10 for the parity check and calibration (a folder model uses its folder)",
    )
    x.add_argument(
        "--parity-images",
        type=_number(int, 0),
        metavar="N",
        help="default 1000; int8: the whole test set (0 = all)",
    )
    x.add_argument(
        "--calibration-images",
        type=POSITIVE_INT,
        default=1000,
        metavar="N",
        help="int8: training images that calibrate activation ranges (default 1000)",
    )


def _serve_parser(sub: Any) -> None:
    sv = _SUBPARSERS["serve"] = sub.add_parser(
        "serve",
        help="HTTP API and web page (FastAPI + uvicorn)",
        description="Serve a model over HTTP: POST /predict, GET /healthz /readyz /metrics "
        "/labels, a web page at / and the API docs at /docs.",
    )
    sv.add_argument("model", metavar="MODEL", help="checkpoint (.pt), TorchScript or ONNX file")
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sv.add_argument("--port", type=_number(int, 1, 65535), default=8000, help="default 8000")
    defaults = ServeConfig()
    for flag, key, kwargs in serve_flags():
        low, above = kwargs.pop("low", None), kwargs.pop("above", None)
        if low is not None or above is not None:
            bound = above if above is not None else low
            kwargs["type"] = _number(kwargs["type"], bound, above=above is not None)
        if "action" not in kwargs:
            kwargs.setdefault("metavar", flag[2:].upper().replace("-", "_"))
        sv.add_argument(flag, dest=key, default=getattr(defaults, key), **kwargs)
    _add_model_flags(sv)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "torchscript", "onnx"),
        default="auto",
        help="default: by file type",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="fp32",
        help="for checkpoints (default fp32; bf16 is faster on CPUs that have it)",
    )
    p.add_argument(
        "--threads", type=POSITIVE_INT, metavar="N", help="CPU threads (default: all cores)"
    )
    _torchscript_flag(p)


def _torchscript_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-torchscript-code",
        action="store_true",
        help="load a TorchScript model: it is a program that runs with your permissions "
        "(it can read and write files), so only for files you trust",
    )


def _add_train_flags(parser: argparse.ArgumentParser, leave_out: set[str] = frozenset()) -> None:
    for flag, key, kwargs in TRAIN_FLAGS:
        if key in leave_out:
            continue
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs = {"metavar": flag[2:].upper().replace("-", "_"), **kwargs}
        parser.add_argument(flag, dest=key, default=S, **kwargs)


def _train_config(args: argparse.Namespace) -> Config:
    from . import config as config_lib

    explicit = {key: getattr(args, key) for _, key, _ in TRAIN_FLAGS if hasattr(args, key)}
    if getattr(args, "resume", False):
        if "train.out" not in explicit:
            raise UserError("--resume needs --out RUN_DIR (the folder of the run to continue)")
        from pathlib import Path

        # The run's config.json (written at its start) is the cheap way to the saved settings;
        # train.run still checks them against last.pt's own copy, so an edited file can't slip by.
        run_dir = Path(explicit["train.out"])
        if not (run_dir / "last.pt").is_file():
            raise UserError(f"--resume: no {run_dir / 'last.pt'}; pass --out to the run folder")
        if (run_dir / "config.json").is_file():
            base = config_lib.load_file(run_dir / "config.json")
        else:
            from . import checkpoint

            base = config_lib.from_dict(checkpoint.load(run_dir / "last.pt")["config"])
    elif args.config:
        base = config_lib.load_file(args.config)
    else:
        base = Config()
    return config_lib.override(base, explicit)


def cmd_data(args: argparse.Namespace) -> int:
    if args.action in ("download", "verify"):
        from .data import cifar10

        root = cifar10.resolve_data_dir(args.data_dir)
        if args.action == "download":
            cifar10.download(root, progress=not args.no_progress)
        print(cifar10.verify(root).describe())
        return EXIT_OK
    from . import data

    data.check(args.data, args.data_dir)
    store_size = args.store_size
    if args.data != "cifar10" and store_size is None:
        import torch

        from .config import default_image_size

        store_size = default_image_size("cuda" if torch.cuda.is_available() else "cpu")
    arrays = data.load(
        args.data,
        data_dir=args.data_dir,
        store_size=store_size,
        download=False,
        progress=not args.no_progress,
    )
    if args.action == "show":
        _show(args, arrays)
        return EXIT_OK
    print(f"source      {arrays.source}")
    print(f"train       {tuple(arrays.train_x.shape)} uint8, labels {tuple(arrays.train_y.shape)}")
    print(f"test        {tuple(arrays.test_x.shape)} uint8, labels {tuple(arrays.test_y.shape)}")
    print(f"classes     {len(arrays.classes)}: {', '.join(arrays.classes)}")
    print(f"cache       {data.user_cache_dir() / 'tensors'}")
    for line in arrays.left_out:
        print(f"left out    {line}")
    return EXIT_OK


def _show(args: argparse.Namespace, arrays: Any) -> None:
    from .data import augment
    from .evaluation import plots
    from .fileio import prepare_output

    prepare_output(args.out, [], "--out")
    images, titles = augment.sample_batch(
        arrays,
        n=args.n,
        seed=args.seed,
        padding=args.crop_padding,
        flip=not args.no_flip,
        mixup=args.mixup,
        cutmix=args.cutmix,
    )
    plots.grid_png(images, titles, args.out)
    print(f"{len(images)} augmented training images → {args.out}")


def cmd_train(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()  # --budget counts the import of torch too
    cfg = _train_config(args)  # every setting checked before torch is imported (~2 s)
    from . import api

    result = api.train(cfg, resume=args.resume, started=started)
    import os

    if int(os.environ.get("RANK", "0") or 0) > 0:  # torchrun: rank 0 prints the results
        return EXIT_INTERRUPTED if result.stopped_early else EXIT_OK
    if result.already_finished:
        n = result.epochs_done
        print(
            f"{result.out_dir} is finished ({n} epochs); nothing was changed. To train longer: "
            f"cifar10-resnet50 train --resume --out {result.out_dir} --epochs {n + 5} "
            "(any number above the epochs done); to start over, choose another --out."
        )
        return EXIT_OK
    if result.stopped_early:
        print(f"stopped; continue with: cifar10-resnet50 train --resume --out {result.out_dir}")
        return EXIT_INTERRUPTED
    if result.best_val_acc is not None:
        print(f"best validation accuracy {100 * result.best_val_acc:.2f}%  → {result.best}")
    print(f"last checkpoint {result.last}")
    if result.test is not None:
        print()
        print(result.test.table())
    return EXIT_OK


def cmd_lr_find(args: argparse.Namespace) -> int:
    cfg = _train_config(args)  # checked before torch is imported
    from . import api

    result = api.lr_find(cfg, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    print(result.table())
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api

    report = api.evaluate(
        args.checkpoint,
        data_source=args.data,
        data_dir=args.data_dir,
        out_dir=args.out,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        tta_flip=args.tta,
        corruptions=args.corruptions,
        corruption_images=args.corruption_images,
        seed=args.seed,
        allow_code=args.allow_torchscript_code,
    )
    print(report.table())
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation import compare

    rows = compare.run(
        args.models,
        out=args.out,
        data_dir=args.data_dir,
        corruption_images=args.corruption_images,
        allow_code=args.allow_torchscript_code,
    )
    print(compare.table(rows))
    print(f"\n→ {args.out}/compare.png and compare.json")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from .fileio import prepare_output, write_bytes
    from .images import printable
    from .serving import inference, predict

    files, rejected = predict.expand(args.paths)
    if args.output:  # fail now, not after the predictions; never overwrite an input
        prepare_output(args.output, [args.model, *files], "--output")
    for r in rejected:
        print(f"error: {printable(r.path)}: {r.reason}", file=sys.stderr)
    predictor = inference.load(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        threads=args.threads,
        allow_code=args.allow_torchscript_code,
    )
    predictions = []
    progress = len(files) > 200 and sys.stderr.isatty()
    for result in predict.predict_files(predictor, files, args.top_k, progress):
        if isinstance(result, predict.Rejected):
            rejected.append(result)
            print(f"error: {result.reason}", file=sys.stderr)
        else:
            predictions.append(result)
    data = predict.encode(predict.render(predictions, args.format))
    if args.output:
        write_bytes(args.output, data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    if rejected:
        print(f"{len(predictions)} predicted, {len(rejected)} rejected", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .serving import export

    report = export.run(
        args.checkpoint,
        args.format,
        out=args.out,
        int8=args.int8,
        data_dir=args.data_dir,
        parity_images=args.parity_images,
        calibration_images=args.calibration_images,
    )
    print(report.table())
    return EXIT_OK if report.passed else EXIT_FAILURE


def cmd_serve(args: argparse.Namespace) -> int:
    from .fileio import require_file
    from .serving import serve

    require_file(args.model, "model")
    settings = ServeConfig(**{key: getattr(args, key) for _, key, _ in serve_flags()})
    serve.run(
        args.model,
        host=args.host,
        port=args.port,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        settings=settings,
        allow_code=args.allow_torchscript_code,
    )
    return EXIT_OK


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
    handler = {
        "data": cmd_data,
        "train": cmd_train,
        "lr-find": cmd_lr_find,
        "evaluate": cmd_evaluate,
        "predict": cmd_predict,
        "export": cmd_export,
        "serve": cmd_serve,
        "compare": cmd_compare,
    }[args.command]
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
