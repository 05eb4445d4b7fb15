"""The default GPU batch and where the training images live follow the card's free memory
(``torch.cuda.mem_get_info``, faked here: no GPU on this machine; nothing here is verified on
a card)."""

from __future__ import annotations

import pytest
import torch

from cifar10_resnet50 import runtime
from cifar10_resnet50.errors import UserError

GIB = 2**30
CUDA = torch.device("cuda", 0)


def _free(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(runtime, "gpu_free_bytes", lambda device: int(gib * GIB))


@pytest.mark.parametrize(
    ("free_gib", "batch"), [(79, 512), (23, 512), (15, 256), (7, 128), (1, 32)]
)
def test_the_default_gpu_batch_is_the_largest_that_fits_the_card(monkeypatch, free_gib, batch):
    _free(monkeypatch, free_gib)
    assert runtime.gpu_default_batch(CUDA, 160) == batch


def test_images_stay_on_the_host_when_they_do_not_fit_and_a_step_that_cannot_fit_is_an_error(
    monkeypatch,
):
    _free(monkeypatch, 20)
    cifar = 50_000 * 3 * 32 * 32  # 153 MB: on the card
    folder = 200_000 * 3 * 160 * 160  # 15 GB of a folder at 160 px: beside a 16 GB step, no
    assert runtime.images_fit_on(CUDA, cifar, 512, 160)
    assert not runtime.images_fit_on(CUDA, folder, 512, 160)
    with pytest.raises(UserError, match="batch 512 and 224 px needs ~29.1 GiB.*Lower --batch-size"):
        runtime.images_fit_on(CUDA, cifar, 512, 224)
    assert runtime.images_fit_on(torch.device("cpu"), folder, 512, 224)  # host memory: no check


def test_an_unset_batch_on_a_small_card_resolves_to_what_fits_and_the_lr_follows(monkeypatch):
    from cifar10_resnet50 import config as C

    cfg = C.resolve(C.Config(), "cuda", gpu_batch=256)
    assert cfg.train.batch_size == 256
    assert (
        cfg.optim.lr
        == C.resolve(C.override(C.Config(), {"train.batch_size": 256}), "cuda").optim.lr
    )
    given = C.resolve(C.override(C.Config(), {"train.batch_size": 64}), "cuda", gpu_batch=256)
    assert given.train.batch_size == 64  # a given batch is never changed
