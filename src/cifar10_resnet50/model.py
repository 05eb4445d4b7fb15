"""The model: torchvision's ResNet-50 (or any torchvision classification model, ``--arch``)
with a new head (one output per class of the data), preprocessing included.

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
    """Preprocess + a torchvision classification network whose last linear layer (``fc`` of a
    ResNet, ``classifier[2]`` of a ConvNeXt, ``heads.head`` of a ViT...) is the new head."""

    def __init__(self, net: nn.Module, preprocess: Preprocess, temperature: float = 1.0):
        super().__init__()
        self.preprocess = preprocess
        self.net = net
        self.head_name = head_name(net)
        # Temperature scaling (Guo et al. 2017), fitted on the validation split after training
        # and stored in the model's metadata: every consumer (predict, serve, the exports'
        # baked-in softmax) divides the logits by it. 1 while training. Not in the state dict,
        # so checkpoints from before it load unchanged.
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    @property
    def head(self) -> nn.Linear:
        return self.net.get_submodule(self.head_name)

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = self.head_name + "."
        return [p for n, p in self.net.named_parameters() if not n.startswith(head)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head sees (float [B,F]) for uint8 images [B,3,H,W]: the backbone's
        pooled features, for any architecture (captured at the head's input)."""
        seen: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        try:
            self.net(self.preprocess(x))
        finally:
            hook.remove()
        return seen[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x)) / self.temperature


def head_name(net: nn.Module) -> str:
    """The qualified name of the network's last linear layer: the classifier of every
    torchvision classification model."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    assert names, "a classification network ends in a linear layer"
    return names[-1]


TIMM = "timm/"  # --arch timm/NAME: a timm model (pip install 'cifar10-resnet50[timm]')


def _timm(arch: str) -> Any:
    """The timm module for a ``timm/NAME`` architecture, or a one-line error."""
    try:
        import timm
    except ImportError as e:
        raise UserError(f"--arch {arch} needs timm: pip install 'cifar10-resnet50[timm]'") from e
    if not timm.is_model(arch[len(TIMM) :]):
        raise UserError(f"--arch {arch}: timm has no such model (timm.list_models() lists them)")
    return timm


def check_arch(arch: str) -> None:
    """A torchvision classification model (or ``timm/NAME`` with timm installed), or a
    one-line error listing the known ones."""
    if arch.startswith(TIMM):
        _timm(arch)
        return
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        import difflib

        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"--arch {arch!r}: not a torchvision classification model{hint} "
            "(torchvision.models.list_models(module=torchvision.models) lists them)"
        )


def _network(arch: str, num_classes: int, image_size: int, zero_init: bool = False) -> nn.Module:
    if arch.startswith(TIMM):
        timm, name = _timm(arch), arch[len(TIMM) :]
        fixed = timm.models.get_pretrained_cfg(name)
        extra = {"img_size": image_size} if fixed and fixed.fixed_input_size else {}
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **extra)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if arch.startswith("vit_"):  # its position embeddings are made for one input size
        kwargs["image_size"] = image_size
    if zero_init and arch.startswith(RESNETS):
        kwargs["zero_init_residual"] = True
    return torchvision.models.get_model(arch, **kwargs)


# From scratch, zero-initialised last BatchNorm of each residual block makes every block start
# as identity (Goyal et al. 2017), which steadies the first steps; torchvision's ResNets offer it.
RESNETS = ("resnet", "resnext", "wide_resnet")


def _reference(arch: str, image_size: int) -> nn.Module:
    """The architecture with its own (1,000-class) head, on the meta device: names and
    shapes without memory."""
    with torch.device("meta"):
        if arch.startswith(TIMM):
            return _network(arch, 1000, image_size)
        return torchvision.models.get_model(arch)


def _reference_state(arch: str, image_size: int = 224) -> dict[str, torch.Tensor]:
    return _reference(arch, image_size).state_dict()


def _head_keys(arch: str) -> set[str]:
    name = head_name(_reference(arch, 224))
    return {f"{name}.weight", f"{name}.bias"}


def check_state_dict(
    state: Any, source: str, arch: str = "resnet50", image_size: int = 224
) -> dict[str, torch.Tensor]:
    """Check a torchvision-format (or timm) state dict of ``arch`` (its head may have any
    size); the head's tensors are dropped. Position embeddings may be for another input size:
    :func:`build` resizes them."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source}: expected a torchvision {arch} state dict (name → tensor)")
    head = _head_keys(arch)
    ref = {k: v for k, v in _reference_state(arch, image_size).items() if k not in head}
    got = {k: v for k, v in state.items() if k not in head}
    missing = sorted(set(ref) - set(got))
    unexpected = sorted(set(got) - set(ref))
    if missing or unexpected:
        hint = ""
        if any(k.startswith(("module.", "net.", "model.")) for k in unexpected):
            hint = " (keys carry a prefix such as 'module.'; save model.state_dict() of the bare network)"
        raise UserError(
            f"{source}: not a torchvision {arch} state dict: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}){hint} — --arch names "
            "the architecture"
        )
    bad = [
        f"{k}: {tuple(got[k].shape)} != {tuple(ref[k].shape)}"
        for k in ref
        if got[k].shape != ref[k].shape and not k.endswith(("pos_embedding", "pos_embed"))
    ]
    if bad:
        raise UserError(f"{source}: tensor shapes differ from {arch}: {'; '.join(bad[:3])}")
    return got


def load_weights_file(
    path: str | Path, arch: str = "resnet50", image_size: int = 224
) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict from disk (or the backbone of one of our checkpoints),
    sha256-checked when its name carries a hash."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"--weights {path}: no such file; use 'imagenet', 'imagenet-v1', 'none' or a path "
            f"to a torchvision {arch} .pth file"
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
    return check_state_dict(state, f"--weights {path}", arch, image_size)


def _torchvision_weights(spec: str, arch: str = "resnet50") -> torchvision.models.WeightsEnum:
    """``imagenet``: the architecture's best torchvision weights (``DEFAULT``; for ResNet-50
    IMAGENET1K_V2); ``imagenet-v1``: its first (IMAGENET1K_V1). Not for timm models."""
    enum = torchvision.models.get_model_weights(arch)
    if spec == "imagenet":
        return enum.DEFAULT
    if not hasattr(enum, "IMAGENET1K_V1"):
        raise UserError(f"--weights imagenet-v1: {arch} has no IMAGENET1K_V1 weights; use imagenet")
    return enum.IMAGENET1K_V1


def fetch_pretrained(
    spec: str, arch: str = "resnet50", progress: bool = True
) -> dict[str, torch.Tensor]:
    """torchvision's hash-checked download (or its cache in $TORCH_HOME); a timm model's
    pretrained weights through timm (the Hugging Face hub, or its cache)."""
    if arch.startswith(TIMM):
        return _fetch_timm(spec, arch)
    weights = _torchvision_weights(spec, arch)
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as e:  # URLError, timeouts, hash mismatch (RuntimeError), disk errors
        raise UserError(
            f"could not get the ImageNet weights {weights} ({type(e).__name__}: {first_line(e)}). "
            f"Offline? Pass --weights PATH to a torchvision {arch} .pth file (for example "
            f"{weights.url.rsplit('/', 1)[-1]} copied from a machine with internet), "
            "or --weights none to train from scratch."
        ) from e
    return check_state_dict(state, str(weights), arch)


def _fetch_timm(spec: str, arch: str) -> dict[str, torch.Tensor]:
    if spec != "imagenet":
        raise UserError(f"--weights {spec}: for {arch} use imagenet (timm's pretrained weights)")
    timm = _timm(arch)
    try:
        net = timm.create_model(arch[len(TIMM) :], pretrained=True)
    except Exception as e:  # no network, hub errors
        raise UserError(
            f"could not get timm's pretrained weights for {arch} ({type(e).__name__}: "
            f"{first_line(e)}). Offline? Pass --weights PATH to its state dict, or --weights none"
        ) from e
    return check_state_dict(net.state_dict(), arch, arch)


def describe_weights(spec: str, arch: str = "resnet50") -> str:
    if spec == "none":
        return "none (random init)"
    if arch.startswith(TIMM) and spec == "imagenet":
        return f"timm {arch[len(TIMM) :]} pretrained"
    if spec in ("imagenet", "imagenet-v1"):
        return f"torchvision {_torchvision_weights(spec, arch)}"
    return f"file {Path(spec).name}"


def backbone_weights(
    weights: str, arch: str = "resnet50", progress: bool = True, image_size: int = 224
) -> dict[str, torch.Tensor] | None:
    """The backbone's state dict for ``weights`` (downloaded or read and checked), or None for
    random init. Separate from :func:`build` so a run fails on missing weights in seconds,
    before it spends minutes on data."""
    check_arch(arch)
    if weights == "none":
        return None
    if weights in ("imagenet", "imagenet-v1"):
        return fetch_pretrained(weights, arch, progress)
    return load_weights_file(weights, arch, image_size)


def build(
    weights: str,
    image_size: int,
    num_classes: int,
    progress: bool = True,
    backbone: dict[str, torch.Tensor] | None = None,
    arch: str = "resnet50",
) -> Classifier:
    """A fresh Classifier with the backbone initialised from ``weights`` (or the already
    fetched ``backbone``) and a new ``num_classes`` head; never silently random."""
    net = _network(arch, num_classes, image_size, zero_init=weights == "none")
    if weights != "none":
        state = (
            backbone
            if backbone is not None
            else backbone_weights(weights, arch, progress, image_size)
        )
        if arch.startswith("vit_"):  # torchvision's position embeddings, their size → ours
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(image_size, net.patch_size, dict(state))
        elif arch.startswith(TIMM):
            state = _timm_adapt(net, state)
        result = net.load_state_dict(state, strict=False)
        # Only the new head may be left out; check_state_dict guarantees the rest matched.
        head = {f"{head_name(net)}.weight", f"{head_name(net)}.bias"}
        assert set(result.missing_keys) == head, result.missing_keys
    model = Classifier(net, Preprocess(image_size, *preprocessing(arch, weights)))
    # A zero-initialised head starts every class at equal probability, so the first
    # gradients reaching the pretrained backbone are small (BiT does the same).
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


def _timm_adapt(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's own adaptation of weights to this model, where the model's family has one
    (``checkpoint_filter_fn``: a ViT's position embeddings resampled from the weights' grid,
    e.g. 14×14 at 224 px, to ours, 4×4 at 64 px), as ``timm.create_model`` does for its
    pretrained weights."""
    import sys

    adapt = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    return adapt(dict(state), net) if adapt is not None else state


def preprocessing(arch: str, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the weights' own transforms (torchvision's ``weights.transforms()``,
    timm's ``pretrained_cfg``); ImageNet's for a torchvision model's random init or file."""
    if arch.startswith(TIMM):
        cfg = _timm(arch).models.get_pretrained_cfg(arch[len(TIMM) :])
        return tuple(cfg.mean), tuple(cfg.std)
    if weights in ("imagenet", "imagenet-v1"):
        t = _torchvision_weights(weights, arch).transforms()
        return tuple(t.mean), tuple(t.std)
    return IMAGENET_MEAN, IMAGENET_STD


def weights_facts(arch: str, weights: str) -> dict[str, Any]:
    """What torchvision says about the weights (parameters, ImageNet top-1, recipe, the
    resolution they were evaluated at), for the model's metadata; empty for others."""
    if weights not in ("imagenet", "imagenet-v1"):
        return {}
    if arch.startswith(TIMM):
        cfg = _timm(arch).models.get_pretrained_cfg(arch[len(TIMM) :])
        return {"name": cfg.hf_hub_id, "input_size": list(cfg.input_size), "license": cfg.license}
    w = _torchvision_weights(weights, arch)
    t = w.transforms()
    return {
        "name": str(w),
        "num_params": w.meta.get("num_params"),
        "imagenet_acc1": w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1"),
        "recipe": w.meta.get("recipe"),
        "crop_size": list(t.crop_size),
        "resize_size": list(t.resize_size),
    }


def model_meta(
    weights: str,
    image_size: int,
    classes: tuple[str, ...] | list[str],
    input_size: int,
    data: dict[str, Any] | None = None,
    arch: str = "resnet50",
) -> dict[str, Any]:
    """Facts about a model that travel inside its checkpoint and exports: its architecture,
    classes, the size of the uint8 images it takes (``input_size``, the dataset's stored
    size), the resolution it resizes them to (``image_size``), its normalisation (the
    weights' own), the weights it started from, and the dataset it was trained on (``data``:
    how ``evaluate`` finds the same test set)."""
    mean, std = preprocessing(arch, weights)
    facts = weights_facts(arch, weights)
    return {
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "input_size": input_size,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "input": f"uint8 RGB [B,3,{input_size},{input_size}]; converted, normalised and "
        "resized inside the model",
        "weights": describe_weights(weights, arch),
        **({"weights_facts": facts} if facts else {}),
        **({"data": data} if data else {}),
    }


def from_meta(meta: dict[str, Any]) -> Classifier:
    """An untrained Classifier with the architecture and preprocessing ``meta`` describes."""
    arch = str(meta.get("arch"))
    check_arch(arch)
    net = _network(arch, int(meta["num_classes"]), int(meta["image_size"]))
    pre = Preprocess(int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    return Classifier(net, pre, float(meta.get("temperature", 1.0)))
