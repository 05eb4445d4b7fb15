"""The command handlers: parsed flags → settings → the work (``cmd_*``, one per command).

What the handlers share: :func:`options` (a declared options dataclass from the parsed flags)
and :func:`train_config` (the training config, from a file, a resumed run or the defaults, with
the given flags over it). Heavy imports (torch) happen inside each handler.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .config import AugmentConfig, Config, train_flags
from .declare import flags
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, UserError
from .evaluation.settings import CompareOptions, EvaluateOptions
from .options import LrFindOptions, ShowOptions
from .serving.settings import ExportOptions, ModelOptions, ServeConfig

TRAIN_FLAGS = train_flags()


def options(args: argparse.Namespace, kind: type, prefix: str = "") -> Any:
    """``kind`` built from the parsed flags it declares (undeclared fields keep defaults)."""
    return kind(
        **{key.removeprefix(prefix): getattr(args, key) for _, key, _ in flags(kind, prefix)}
    )


def train_config(args: argparse.Namespace) -> Config:
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
    progress = args.progress
    if args.action in ("download", "verify"):
        from .data import cifar10

        root = cifar10.resolve_data_dir(getattr(args, "data.data_dir"))
        if args.action == "download":
            cifar10.download(root, progress=progress)
        print(cifar10.verify(root).describe())
        return EXIT_OK
    from . import data
    from .config import override

    # Checked as train checks the same settings, before any data is read.
    given = {key: getattr(args, key) for key in vars(args) if key.startswith(("data.", "augment."))}
    cfg = override(Config(), given)
    d = cfg.data
    data.check(d.source, d.data_dir)
    store_size = d.store_size
    if d.source != "cifar10" and store_size is None:
        import torch

        from .config import default_image_size

        store_size = default_image_size("cuda" if torch.cuda.is_available() else "cpu")
    arrays = data.load(
        d.source, data_dir=d.data_dir, store_size=store_size, download=False, progress=progress
    )
    if args.action == "show":
        _show(options(args, ShowOptions), cfg.augment, arrays)
        return EXIT_OK
    print(f"source      {arrays.source}")
    print(f"train       {tuple(arrays.train_x.shape)} uint8, labels {tuple(arrays.train_y.shape)}")
    print(f"test        {tuple(arrays.test_x.shape)} uint8, labels {tuple(arrays.test_y.shape)}")
    print(f"classes     {len(arrays.classes)}: {', '.join(arrays.classes)}")
    print(f"cache       {data.user_cache_dir() / 'tensors'}")
    for line in arrays.left_out:
        print(f"left out    {line}")
    return EXIT_OK


def _show(show: Any, a: AugmentConfig, arrays: Any) -> None:
    from .data import augment
    from .evaluation import plots
    from .fileio import prepare_output

    prepare_output(show.out, [], "--out")
    images, titles = augment.sample_batch(arrays, n=show.n, seed=show.seed, recipe=a)
    plots.grid_png(images, titles, show.out)
    print(f"{len(images)} augmented training images → {show.out}")


def cmd_train(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()  # --budget counts the import of torch too
    cfg = train_config(args)  # every setting checked before torch is imported (~2 s)
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
    cfg = train_config(args)  # checked before torch is imported
    from . import api

    result = api.lr_find(cfg, **dataclasses.asdict(options(args, LrFindOptions)))
    print(result.table())
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api

    chosen = options(args, EvaluateOptions)
    report = api.evaluate(args.checkpoint, **dataclasses.asdict(chosen))
    print(report.table())
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation import compare

    rows = compare.run(args.models, **dataclasses.asdict(options(args, CompareOptions)))
    print(compare.table(rows))
    print(f"\n→ {args.out}/compare.png and compare.json")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from .fileio import prepare_output
    from .images import printable
    from .serving import bulk, inference
    from .serving.files import Shard
    from .serving.predict import default_workers

    shard = Shard.parse(args.shard)
    if args.output:  # fail now, not after the predictions; never overwrite an input
        prepare_output(args.output, [args.model, *args.paths], "--output")
    model = options(args, ModelOptions)
    predictor = inference.load(
        args.model, batch_size=args.batch_size, busy_wait=args.workers == 0,
        **dataclasses.asdict(model),
    )  # fmt: skip
    workers = args.workers
    if workers is None:
        workers = default_workers(model.threads, predictor.on_gpu)

    def report(r: Any) -> None:
        print(f"error: {printable(r.path)}: {r.reason}", file=sys.stderr)

    try:
        summary = bulk.run(
            predictor, args.paths, top_k=args.top_k, fmt=args.format, output=args.output,
            workers=workers, shard=shard, resume=args.resume, tta=args.tta, on_rejected=report,
            progress=sys.stderr.isatty(),
        )  # fmt: skip
    except KeyboardInterrupt:
        if bulk.resumable(args.output):
            print(f"the files done are kept in {args.output}.partial: run the same command "
                  "with --resume to continue", file=sys.stderr)  # fmt: skip
        raise
    print(summary.line(), file=sys.stderr)
    return EXIT_USER_ERROR if summary.rejected else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .serving import export

    report = export.run(args.checkpoint, **dataclasses.asdict(options(args, ExportOptions)))
    print(report.table())
    return EXIT_OK if report.passed else EXIT_FAILURE


def cmd_serve(args: argparse.Namespace) -> int:
    from .fileio import require_file
    from .serving import serve

    require_file(args.model, "model")
    model, settings = options(args, ModelOptions), options(args, ServeConfig)
    serve.run(args.model, model=model, settings=settings)
    return EXIT_OK


HANDLERS = {
    "data": cmd_data,
    "train": cmd_train,
    "lr-find": cmd_lr_find,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "export": cmd_export,
    "serve": cmd_serve,
    "compare": cmd_compare,
}
