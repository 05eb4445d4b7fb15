"""``compare RUN_OR_MODEL...``: runs, strategies or exports side by side, by evidence — clean
accuracy with its 95 % interval, accuracy under the CIFAR-10-C corruptions, calibration (ECE),
file size and measured inference speed — as a table, compare.json and compare.png."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import ensure_writable_dir, write_json
from ..serving import inference
from . import evaluate
from .settings import CompareOptions

SPEED_IMAGES = 512  # timed at batch 64, after one warm-up batch


@dataclass(frozen=True)
class Row:
    name: str
    path: str
    accuracy: float
    ci95: tuple[float, float]
    corruption_accuracy: float
    ece: float
    temperature: float
    size_mb: float
    images_per_s: float


def _speed(path: Path, allow_code: bool) -> float:
    """Images per second at batch 64 on the CPU, as predict and serve run it."""
    predictor = inference.load(path, allow_code=allow_code)
    size = predictor.input_size
    batch = np.random.default_rng(0).integers(0, 256, (64, 3, size, size), dtype=np.uint8)
    predictor.run(batch)
    t0 = time.perf_counter()
    for _ in range(SPEED_IMAGES // 64):
        predictor.run(batch)
    return SPEED_IMAGES / (time.perf_counter() - t0)


def run(
    paths: list[str],
    *,
    out: str | Path,
    data_dir: str | Path | None = CompareOptions.data_dir,
    corruption_images: int = CompareOptions.corruption_images,
    test_images: int | None = CompareOptions.test_images,
    allow_code: bool = CompareOptions.allow_code,
    device: str = "auto",
    progress: bool = True,
) -> list[Row]:
    """Evaluate each model (clean test set, then the corruption sweep on a stratified
    ``corruption_images``), time it, and write compare.json and compare.png into ``out``."""
    models = [evaluate.resolve_model(p) for p in paths]
    if len(models) < 2:
        raise UserError("compare needs at least two runs or model files")
    out = ensure_writable_dir(Path(out))
    rows = []
    for path in models:
        with tempfile.TemporaryDirectory() as tmp:
            report = evaluate.run(
                path, data_dir=data_dir, out_dir=tmp, device=device, plot=False,
                corruptions=True, corruption_images=corruption_images, allow_code=allow_code,
                test_images=test_images, progress=progress,
            )  # fmt: skip
        m, sweep = report.metrics, report.robustness or {}
        rows.append(
            Row(
                name=path.name if path.name not in ("best.pt", "last.pt") else str(path),
                path=str(path),
                accuracy=m["accuracy"],
                ci95=tuple(m["accuracy_ci95"]),
                corruption_accuracy=sweep["mean_corruption_accuracy"],
                ece=m["calibration"]["ece"],
                temperature=m["calibration"]["temperature"],
                size_mb=path.stat().st_size / 2**20,
                images_per_s=_speed(path, allow_code),
            )
        )
    write_json(
        out / "compare.json",
        {"corruption_images": corruption_images, "models": [asdict(r) for r in rows]},
    )
    _png(rows, out / "compare.png", corruption_images)
    return rows


def table(rows: list[Row]) -> str:
    head = f"{'model':<40}{'test accuracy (95% CI)':>26}{'corrupted':>11}{'ECE':>8}{'MB':>8}{'img/s':>9}"
    lines = [head]
    for r in rows:
        acc = f"{100 * r.accuracy:.2f}% ({100 * r.ci95[0]:.1f}–{100 * r.ci95[1]:.1f})"
        lines.append(
            f"{r.name[-40:]:<40}{acc:>26}{100 * r.corruption_accuracy:>10.2f}%"
            f"{100 * r.ece:>7.2f}%{r.size_mb:>8.1f}{r.images_per_s:>9.0f}"
        )
    return "\n".join(lines)


def _png(rows: list[Row], path: Path, corruption_images: int) -> None:
    from . import plots

    plots.write_figure(comparison_figure(rows, corruption_images), path)


def comparison_figure(rows: list[Row], corruption_images: int):
    """Accuracy (clean and corrupted), calibration error and speed, one bar per model."""
    from . import plots

    plt = plots.pyplot()
    names = [r.name[-28:] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(5 + 2.2 * len(rows), 4.5), layout="constrained")
    acc, ax_ece, ax_speed = axes
    err = np.array(
        [[100 * (r.accuracy - r.ci95[0]), 100 * (r.ci95[1] - r.accuracy)] for r in rows]
    ).T
    acc.bar(
        x - 0.2, [100 * r.accuracy for r in rows], 0.4, yerr=err, capsize=4, label="clean (95% CI)"
    )
    acc.bar(
        x + 0.2,
        [100 * r.corruption_accuracy for r in rows],
        0.4,
        label=f"corrupted ({corruption_images} images)",
    )
    acc.set(ylabel="test accuracy (%)", title="accuracy")
    acc.legend(fontsize=8)
    ax_ece.bar(x, [100 * r.ece for r in rows], color="tab:orange")
    ax_ece.set(ylabel="ECE (%)", title="calibration error (lower is better)")
    ax_speed.bar(x, [r.images_per_s for r in rows], color="tab:green")
    ax_speed.set(ylabel="images/s (CPU, batch 64)", title="inference speed")
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return fig
