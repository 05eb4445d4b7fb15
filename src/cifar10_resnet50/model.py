"""The model: torchvision's ResNet-50 with a new head (one output per class of the data),
preprocessing included.

``Classifier`` takes raw uint8 RGB images ``[B,3,H,W]`` and returns logits. Conversion,
ImageNet normalisation and the resize to the training resolution happen inside, on whatever
device the model is on, so a checkpoint or an export needs nothing but pixels.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import UserError, first_line
from .fileio import file_digest

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision names its files "<name>-<first 8+ hex digits of the sha256>.pth" and checks it.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


class Preprocess(nn.Module):
    """uint8 RGB ``[B,3,H,W]`` → normalised float ``[B,3,S,S]`` (S = ``image_size``)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.image_size = image_size
        # Folding /255 and the normalisation into one multiply-add: x * scale - shift.
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise before resizing: the two commute (both linear), and on small stored images
        # it touches (S/s)² fewer pixels than after (25× fewer from CIFAR's 32 px to S=160).
        x = x.float() * self.scale - self.shift
        if x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return x


class Classifier(nn.Module):
    """Preprocess + torchvision ResNet-50 whose ``fc`` is the new head (one output per class)."""

    def __init__(self, net: nn.Module, preprocess: Preprocess, temperature: float = 1.0):
        super().__init__()
        self.preprocess = preprocess
        self.net = net
        # Temperature scaling (Guo et al. 2017), fitted on the validation split after training
        # and stored in the model's metadata: every consumer (predict, serve, the exports'
        # baked-in softmax) divides the logits by it. 1 while training. Not in the state dict,
        # so checkpoints from before it load unchanged.
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    @property
    def head(self) -> nn.Module:
        return self.net.fc

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.net.named_parameters() if not n.startswith("fc.")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x)) / self.temperature


def _reference_state() -> dict[str, torch.Tensor]:
    return torchvision.models.resnet50().state_dict()


def check_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    """Check a torchvision-format ResNet-50 state dict (the ``fc`` layer may have any size)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source}: expected a torchvision ResNet-50 state dict (name → tensor)")
    ref = {k: v for k, v in _reference_state().items() if not k.startswith("fc.")}
    got = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(ref) - set(got))
    unexpected = sorted(set(got) - set(ref))
    if missing or unexpected:
        hint = ""
        if any(k.startswith(("module.", "net.", "model.")) for k in unexpected):
            hint = " (keys carry a prefix such as 'module.'; save model.state_dict() of the bare ResNet)"
        raise UserError(
            f"{source}: not a torchvision ResNet-50 state dict: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}){hint}"
        )
    bad = [
        f"{k}: {tuple(got[k].shape)} != {tuple(ref[k].shape)}"
        for k in ref
        if got[k].shape != ref[k].shape
    ]
    if bad:
        raise UserError(f"{source}: tensor shapes differ from ResNet-50: {'; '.join(bad[:3])}")
    return got


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict from disk (or the backbone of one of our checkpoints),
    sha256-checked when its name carries a hash."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"--weights {path}: no such file; use 'imagenet', 'imagenet-v1', 'none' or a path "
            "to a torchvision ResNet-50 .pth file"
        )
    match = _HASH_IN_NAME.search(path.name)
    if match:
        digest = file_digest(path, "sha256")
        if not digest.startswith(match.group(1)):
            raise UserError(
                f"--weights {path}: sha256 {digest[:12]}… does not match the {match.group(1)} "
                "in its name; the file is corrupt or incomplete — download it again"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, disallowed globals...
        raise UserError(
            f"--weights {path}: cannot load as a PyTorch state dict ({first_line(e)})"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "model_meta" in state:
        # One of our checkpoints (a linear probe's best.pt, say): its backbone, so a fine-tune
        # can start from it; the head is new as always.
        state = {k[4:]: v for k, v in state["model"].items() if k.startswith("net.")}
    return check_state_dict(state, f"--weights {path}")


def _torchvision_weights(spec: str) -> torchvision.models.WeightsEnum:
    w = torchvision.models.ResNet50_Weights
    return w.IMAGENET1K_V2 if spec == "imagenet" else w.IMAGENET1K_V1


def fetch_pretrained(spec: str, progress: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's hash-checked download (or its cache in $TORCH_HOME)."""
    weights = _torchvision_weights(spec)
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as e:  # URLError, timeouts, hash mismatch (RuntimeError), disk errors
        raise UserError(
            f"could not get the ImageNet weights {weights} ({type(e).__name__}: {first_line(e)}). "
            "Offline? Pass --weights PATH to a torchvision resnet50 .pth file (for example "
            f"{weights.url.rsplit('/', 1)[-1]} copied from a machine with internet), "
            "or --weights none to train from scratch."
        ) from e
    return check_state_dict(state, str(weights))


def describe_weights(spec: str) -> str:
    if spec == "none":
        return "none (random init)"
    if spec in ("imagenet", "imagenet-v1"):
        return f"torchvision {_torchvision_weights(spec)}"
    return f"file {Path(spec).name}"


def backbone_weights(weights: str, progress: bool = True) -> dict[str, torch.Tensor] | None:
    """The backbone's state dict for ``weights`` (downloaded or read and checked), or None for
    random init. Separate from :func:`build` so a run fails on missing weights in seconds,
    before it spends minutes on data."""
    if weights == "none":
        return None
    if weights in ("imagenet", "imagenet-v1"):
        return fetch_pretrained(weights, progress)
    return load_weights_file(weights)


def build(
    weights: str,
    image_size: int,
    num_classes: int,
    progress: bool = True,
    backbone: dict[str, torch.Tensor] | None = None,
) -> Classifier:
    """A fresh Classifier with the backbone initialised from ``weights`` (or the already
    fetched ``backbone``) and a new ``num_classes`` head; never silently random."""
    # From scratch, zero-initialised last BatchNorm of each block makes every residual block
    # start as identity (Goyal et al. 2017), which steadies the first steps.
    net = torchvision.models.resnet50(num_classes=num_classes, zero_init_residual=weights == "none")
    if weights != "none":
        state = backbone if backbone is not None else backbone_weights(weights, progress)
        result = net.load_state_dict(state, strict=False)
        # Only the new head may be left out; check_state_dict guarantees the rest matched.
        assert set(result.missing_keys) == {"fc.weight", "fc.bias"}, result.missing_keys
    # A zero-initialised head starts every class at equal probability, so the first
    # gradients reaching the pretrained backbone are small (BiT does the same).
    nn.init.zeros_(net.fc.weight)
    nn.init.zeros_(net.fc.bias)
    return Classifier(net, Preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD))


def model_meta(
    weights: str,
    image_size: int,
    classes: tuple[str, ...] | list[str],
    input_size: int,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Facts about a model that travel inside its checkpoint and exports: its classes, the
    size of the uint8 images it takes (``input_size``, the dataset's stored size), the
    resolution it resizes them to (``image_size``), its normalisation, and the dataset it was
    trained on (``data``: how ``evaluate`` finds the same test set)."""
    return {
        "arch": "resnet50",
        "num_classes": len(classes),
        "classes": list(classes),
        "input_size": input_size,
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": f"uint8 RGB [B,3,{input_size},{input_size}]; converted, normalised and "
        "resized inside the model",
        "weights": describe_weights(weights),
        **({"data": data} if data else {}),
    }


def from_meta(meta: dict[str, Any]) -> Classifier:
    """An untrained Classifier with the architecture and preprocessing ``meta`` describes."""
    if meta.get("arch") != "resnet50":
        raise UserError(f"unsupported architecture {meta.get('arch')!r} in checkpoint")
    net = torchvision.models.resnet50(num_classes=int(meta["num_classes"]))
    pre = Preprocess(int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    return Classifier(net, pre, float(meta.get("temperature", 1.0)))
