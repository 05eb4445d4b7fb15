"""The device check (issue 19): everything a first GPU loan should measure, in one call.

Prepare once, here (the GPU machine receives only the checkout; ``../shared`` does not travel):

    mkdir -p gpu-data && cp -r ../shared/cifar10-compact gpu-data/
    grep -qx 'gpu-data/' .git/info/exclude || echo 'gpu-data/' >> .git/info/exclude

then, with the device tool: ``run(command="PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh",
carry=["gpu-data"], timeout_s=540)``. ``--data`` takes the carried compact copy (unpacked into a
temporary folder by its own ``unpack.py``) or any folder holding ``cifar-10-batches-py/``.

Rows, each printed the moment it is measured and appended to ``$OUT/gpu_check.jsonl`` (or
``--record FILE``) so that one late failure loses nothing:

1. the model's training step alone, 160 px, batch 512, eager then compiled (and inference);
2. the real ``train`` with its defaults for 3 epochs: train-loop and whole-run img/s, wall
   time and each epoch's time split (train / validate / save / other);
3. the same with ``--compile on``;
4. the tutorial pipeline with AMP (torchvision ``CIFAR10`` + PIL transforms + ``Resize`` +
   ``DataLoader`` + bf16 + channels_last) at batch 128/256/512 (its best is the baseline;
   workers sized to ``/dev/shm``);
5. two processes on the one GPU (``CIFAR10_DIST_BACKEND=gloo``): DDP and ``--sync-bn``;
6. ``predict`` on 2,000 PNG files, and ``evaluate`` on the 10,000 test images.

About 6 minutes on an H100 (``--quick``: rows 1, 2, 4 at batch 512 only, ~3 minutes;
``--full-recipe`` adds the 10-epoch default's whole command, ~1.5 minutes more).
``--smoke`` runs every row at tiny sizes on any device: the test suite runs it on the CPU, so
this script cannot rot between GPU loans (the compiled rows only with ``--compile-on-cpu``:
``scripts/rehearse_device.sh`` runs both with the GPU image's torch and packages). ``--weights none`` throughout (no network there;
throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_DATA = ROOT / "gpu-data" / "cifar10-compact"
NO_COMPILE = "CPU smoke: a compile costs ~76 s here (--compile-on-cpu runs it)"


class Recorder:
    """Prints each row as it comes and appends it to a JSON-lines file."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def row(self, what: str, **values) -> None:
        record = {"what": what, **values}
        print("ROW " + json.dumps(record), flush=True)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def attempt(self, what: str, measure) -> None:
        """One row: ``measure()`` returns its values; a failure is a row too, and the check
        goes on (one failing mode must not hide the others)."""
        t0 = time.perf_counter()
        try:
            values = measure()
        except Exception as e:
            detail = getattr(e, "stderr", None) or str(e)
            self.row(what, failed=f"{type(e).__name__}: {str(detail).strip()[-600:]}")
            return
        self.row(what, **values, check_s=round(time.perf_counter() - t0, 1))


def cifar_folder(data: Path) -> Path:
    """A folder holding ``cifar-10-batches-py/``: ``data`` itself, or the compact copy
    unpacked by its own script into a temporary folder."""
    if (data / "cifar-10-batches-py" / "batches.meta").is_file():
        return data
    if (data / "unpack.py").is_file():
        dest = Path(tempfile.mkdtemp(prefix="cifar10-"))
        subprocess.run([sys.executable, str(data / "unpack.py"), str(dest)], check=True)
        return dest
    raise SystemExit(
        f"gpu_bench: {data} holds neither cifar-10-batches-py/ nor the compact copy's unpack.py; "
        "copy ../shared/cifar10-compact into gpu-data/ and carry it (see this file's docstring)"
    )


def shm_workers(batch: int, px: int, cores: int) -> int:
    """DataLoader workers that /dev/shm can hold: each keeps 2 batches of float32 images in
    shared memory (prefetch_factor 2); a container's 64 MB /dev/shm kills workers with a bus
    error otherwise."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0
    per_worker = 2 * batch * 3 * px * px * 4 * 1.5  # bytes, with slack for the labels, pickling
    return max(0, min(cores, int(free // per_worker)))


def tutorial_amp(data_dir: Path, px: int, batch: int, images: int, device: str) -> dict:
    """img/s of the warm epoch of the tutorial pipeline with bf16 autocast."""
    import torch
    import torchvision
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.transforms as T

    tv_cifar.check_integrity = lambda *a, **k: True  # re-encoded copy: md5s differ by design
    transform = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.Resize(px), T.ToTensor(),
         T.Normalize(MEAN, STD)]
    )  # fmt: skip
    ds = torchvision.datasets.CIFAR10(
        str(data_dir), train=True, download=False, transform=transform
    )
    ds = torch.utils.data.Subset(ds, range(images))
    workers = shm_workers(batch, px, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device == "cuda",
        drop_last=True, persistent_workers=workers > 0,
    )  # fmt: skip
    model = torchvision.models.resnet50(num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rate = 0.0
    for _ in range(2):  # the first epoch warms up (workers, cuDNN); the second is timed
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if device == "cuda":
            torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - t0)
    return {"img_per_s": round(rate), "batch": batch, "workers": workers}


def command(args: list[str], env: dict | None = None, nproc: int = 1) -> float:
    """Run the CLI (under torchrun for ``nproc`` > 1); its wall seconds. Its log goes to ours."""
    cmd = ["-m", "cifar10_resnet50", *args]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd]
    # Ours first, the caller's after it: on the GPU machine, wheels carried for a missing
    # package are found through PYTHONPATH (the device README's recipe).
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *cmd], env=full_env, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return time.perf_counter() - t0


def train_row(
    source: list[str], out: Path, extra: list[str], env: dict | None = None, nproc: int = 1
):
    """The real ``train`` command: img/s (train loop, warm epochs; and the whole run) and each
    epoch's time split, from its own metrics.jsonl."""

    def measure() -> dict:
        wall = command(
            ["train", *source, "--weights", "none", "--no-progress",
             "--out", str(out), *extra], env, nproc,
        )  # fmt: skip
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        warm = rows[1:] or rows
        images = sum(r["images"] for r in rows)
        epochs_s = sum(sum(r["time"].values()) for r in rows)
        return {
            "img_per_s": round(sum(r["images"] for r in warm) / sum(r["seconds"] for r in warm)),
            "whole_run_img_per_s": round(images / epochs_s),
            "wall_s": round(wall, 1),
            "time_split_s": [r["time"] for r in rows],
            "val_acc": rows[-1]["val_acc"],
        }

    return measure


def write_pngs(data_dir: Path, folder: Path, n: int, by_class: bool = False) -> None:
    """The first ``n`` test images as PNG files (``by_class``: in one folder per class, a
    ``folder:`` data source)."""
    from PIL import Image

    from cifar10_resnet50.data import cifar10

    arrays = cifar10.load(data_dir)
    for i in range(min(n, len(arrays.test_x))):
        where = folder / arrays.classes[int(arrays.test_y[i])] if by_class else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arrays.test_x[i].permute(1, 2, 0).numpy()).save(where / f"{i:05d}.png")


def data_source(data: Path, cuda: bool, work: Path) -> list[str]:
    """The ``train`` flags for the data: CIFAR-10 on a GPU; in a CPU smoke run, 240 of its
    images as a folder with a 50-image test split, so that no step evaluates 10,000 images."""
    if cuda:
        return ["--data-dir", str(data)]
    write_pngs(data, work / "folder", 240, by_class=True)
    return ["--data", f"folder:{work / 'folder'}", "--test-size", "50"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="compact copy or CIFAR folder")
    p.add_argument("--quick", action="store_true", help="rows 1, 2 and 4 (batch 512) only")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (wiring)")
    p.add_argument("--full-recipe", action="store_true", help="also the 10-epoch default")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="with --smoke: the compiled rows too (~4 minutes more on 2 cores)")  # fmt: skip
    p.add_argument("--record", type=Path, help="JSON-lines file (default $OUT/gpu_check.jsonl)")
    args = p.parse_args()

    import torch

    from gpu_check import measure

    out_env = os.environ.get("OUT")
    rec = Recorder(args.record or (Path(out_env) / "gpu_check.jsonl" if out_env else None))
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    rec.row(
        "machine", device=torch.cuda.get_device_name() if cuda else "cpu",
        gpus=torch.cuda.device_count() if cuda else 0, torch=torch.__version__,
        cores=os.cpu_count(), shm_free_gb=round(shutil.disk_usage("/dev/shm").free / 2**30, 1)
        if Path("/dev/shm").exists() else None,
    )  # fmt: skip
    data = cifar_folder(args.data)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    px, batch, steps = (160, 512, 30) if cuda else (32, 16, 2)
    source = data_source(data, cuda, work)
    small = [] if cuda else ["--image-size", "32", "--batch-size", "32", "--val-size", "64",
                             "--device", "cpu"]  # fmt: skip
    compiles = cuda or args.compile_on_cpu
    for compiled in (False, True) if (cuda or not args.quick) else (False,):
        if compiled and not compiles:
            rec.row("model step, compiled", skipped=NO_COMPILE)
            continue
        rec.attempt(
            f"model step, batch {batch}, {px} px, {'compiled' if compiled else 'eager'}",
            lambda c=compiled: dict(zip(("img_per_s", "inference_img_per_s"),
                                        map(round, measure(torch.device(device), px, c, batch,
                                                           steps, 5 if cuda else 1)), strict=True)),
        )  # fmt: skip
    # One call for both rows, so the eager row (run by the CPU smoke test) checks the
    # compiled row's wiring too.
    for name, flags in (("defaults", []), ("--compile on", ["--compile", "on"])):
        if flags and args.quick:
            continue
        if flags and not compiles:
            rec.row(f"train {name}", skipped=NO_COMPILE)
            continue
        run = work / ("run-compiled" if flags else "run")
        rec.attempt(
            f"train {name}, 3 epochs", train_row(source, run, ["--epochs", "3", *flags, *small])
        )
    batches = (512,) if args.quick else (128, 256, 512) if cuda else (32,)
    images = 50_000 if cuda else 96
    for b in batches:
        rec.attempt(
            f"tutorial + AMP, batch {b}", lambda b=b: tutorial_amp(data, px, b, images, device)
        )
    if not args.quick:
        rec.attempt(
            "2 processes on one device (gloo), DDP + --sync-bn, 1 epoch",
            train_row(source, work / "run-ddp", ["--epochs", "1", "--sync-bn", *small],
                      env={"CIFAR10_DIST_BACKEND": "gloo"}, nproc=2),
        )  # fmt: skip
        best = work / "run" / "best.pt"
        pngs = work / "pngs"
        n = 2000 if cuda else 64

        def predict() -> dict:
            write_pngs(data, pngs, n)
            wall = command(["predict", str(best), str(pngs), "--format", "csv", "--output",
                            str(work / "predictions.csv"), "--device", device])  # fmt: skip
            return {
                "files": n,
                "img_per_s_with_start_up": round(n / wall),
                "wall_s": round(wall, 1),
            }

        def evaluate() -> dict:
            where = ["--data-dir", str(data)] if cuda else []  # else: the model's own folder
            wall = command(["evaluate", str(best), *where, "--device", device,
                            "--out", str(work / "eval")])  # fmt: skip
            count = json.loads((work / "eval" / "metrics.json").read_text())["count"]
            return {"images": count, "wall_s": round(wall, 1)}

        rec.attempt(f"predict, {n} PNG files", predict)
        rec.attempt("evaluate, the test set", evaluate)
    if args.full_recipe:
        rec.attempt("train defaults, 10 epochs (whole command)",
                    train_row(source, work / "run-full", small))  # fmt: skip
    if cuda:  # the model-step rows ran in this process: their peak calibrates the batch rule
        rec.row("peak GPU memory, model step rows (batch 512, 160 px)",
                gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))  # fmt: skip
    rec.row("done")


if __name__ == "__main__":
    main()
