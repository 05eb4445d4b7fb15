"""Glass blur, motion blur, snow and frost: ours (before issue 23 and now) against the
reference generator, on the same 1,000 test images: strength (mean |corrupted − clean|, 0–255
levels) as a ratio to the reference's, and a model's accuracy on each.

    /tmp/refvenv/bin/python benchmarks/cifar_c_reference.py ... --accuracy-out /tmp/ref.npz
    .venv/bin/python benchmarks/cifar_c_vs_reference.py --reference /tmp/ref.npz \\
        --model runs/first/best.pt --before 698eafb

``--before COMMIT``: the corruptions module as it was at that commit (read with git show).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types

import numpy as np
import torch

from cifar10_resnet50 import checkpoint
from cifar10_resnet50.evaluation import corruptions, evaluate

NAMES = ("glass_blur", "motion_blur", "snow", "frost")


def module_at(commit: str) -> types.ModuleType:
    path = "src/cifar10_resnet50/evaluation/corruptions.py"
    source = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    module = types.ModuleType("corruptions_before")
    module.__package__ = corruptions.__package__
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)  # noqa: S102
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--before", default="698eafb")
    args = p.parse_args()
    ref = dict(np.load(args.reference))
    clean = torch.from_numpy(ref["images"]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(ref["labels"]).long()
    model, _ = checkpoint.load_model(args.model, "cpu")

    def accuracy(x: torch.Tensor) -> float:
        logits = evaluate.predict_logits(model, x, batch_size=500, device=torch.device("cpu"),
                                         amp_dtype=None)  # fmt: skip
        return 100 * float((logits.argmax(1) == labels).float().mean())

    def strength(x: torch.Tensor) -> float:
        return float((x.float() - clean.float()).abs().mean())

    versions = {"before": module_at(args.before), "now": corruptions}
    print(f"clean accuracy {accuracy(clean):.1f} % ({len(labels)} images, {args.model})\n")
    print(
        "| corruption | severity | strength ÷ reference, before | now | accuracy: reference | before | now |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in NAMES:
        for s in range(1, 6):
            theirs = torch.from_numpy(ref[name][s - 1]).permute(0, 3, 1, 2).contiguous()
            row = {k: m.corrupt(clean, name, s) for k, m in versions.items()}
            ratios = [strength(row[k]) / strength(theirs) for k in versions]
            accs = [accuracy(theirs)] + [accuracy(row[k]) for k in versions]
            print(f"| {name} | {s} | {ratios[0]:.2f} | {ratios[1]:.2f} | "
                  + " | ".join(f"{a:.1f}" for a in accs) + " |", flush=True)  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
