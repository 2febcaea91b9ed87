"""Unit tests of the pieces under the training loop: optimizer groups, early stopping, augmentation,
sharding, the disk-space guard."""

import dataclasses
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from fashion_ft import trainer
from fashion_ft.config import Config
from fashion_ft.data import AugmentConfig, affine_grid, augment, make_batch
from fashion_ft.engine import (
    EarlyStopping,
    Runtime,
    TrainStep,
    apply_freezing,
    build_optimizer,
    build_schedulers,
    make_ema,
    predict_logits,
    rank_shard,
)
from fashion_ft.errors import UserError
from fashion_ft.model import build_model
from fashion_ft.system import AmpPolicy


def test_optimizer_gets_trainable_params_only_and_no_decay_on_biases_and_norms():
    model = build_model("cnn3")
    apply_freezing(model, freeze_conv=True, freeze_bn=False)
    opt = build_optimizer(model, Config(), lr=1e-3)
    decay, no_decay = opt.param_groups
    trainable = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert decay["weight_decay"] == 0.01 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_sgd_default_weight_decay_and_nesterov():
    opt = build_optimizer(build_model("cnn3"), Config(optimizer="sgd"), lr=0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["weight_decay"] == 5e-4
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_nothing_to_train_is_an_error():
    model = build_model("cnn3")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="nothing to train"):
        build_optimizer(model, Config(), lr=1e-3)


@pytest.mark.parametrize("monitor, values, stop_after", [
    ("val_acc", [0.5, 0.6, 0.6, 0.59], 4),  # equal is no improvement
    ("val_loss", [1.0, 0.9, 0.95, 0.91], 4),
])
def test_early_stopping_counts_epochs_without_improvement(monitor, values, stop_after):
    stopper = EarlyStopping(monitor, patience=2)
    stopped_at = None
    for epoch, value in enumerate(values, 1):
        stopper.update(value, epoch)
        if stopper.should_stop:
            stopped_at = epoch
            break
    assert stopped_at == stop_after
    assert stopper.best_epoch == 2


def test_min_delta_requires_a_real_improvement():
    stopper = EarlyStopping("val_acc", patience=5, min_delta=0.01)
    assert stopper.update(0.80, 1) and not stopper.update(0.805, 2) and stopper.update(0.82, 3)


def test_flip_only_augmentation_mirrors_exactly():
    images = torch.rand(64, 1, 28, 28)
    out = augment(images, AugmentConfig(hflip=True), torch.Generator().manual_seed(0))
    mirrored = torch.isclose(out, images.flip(-1), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(out, images, atol=1e-5).flatten(1).all(1)
    assert (mirrored | kept).all() and 10 < mirrored.sum() < 54


def test_rotation_is_bounded_and_seeded():
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 10:18, 4:24] = 1.0  # a horizontal bar
    aug = AugmentConfig(rotate_deg=10.0)
    a = augment(images.clone(), aug, torch.Generator().manual_seed(1))
    b = augment(images.clone(), aug, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (a - images).abs().mean() > 0.01  # it moved
    assert a.sum(dim=(1, 2, 3)).sub(images.sum(dim=(1, 2, 3))).abs().max() < 8  # mass kept: a small rotation


def test_random_erasing_zeroes_a_box_in_about_p_of_the_images():
    images = torch.ones(2000, 1, 28, 28)
    out = augment(images, AugmentConfig(erase_p=0.25), torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).any(1).float()
    assert 0.2 < erased.mean() < 0.3
    area = (out == 0).flatten(1).float().mean(1)[erased.bool()]
    assert area.min() > 0 and area.max() <= 0.25


def test_make_batch_normalises_and_uses_the_memory_format():
    batch = make_batch(torch.full((4, 1, 28, 28), 255, dtype=torch.uint8), None, None, 0.5, 0.25,
                       torch.channels_last)
    assert torch.allclose(batch, torch.full_like(batch, 2.0))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_rank_shards_are_disjoint_equal_and_cover_all_but_the_remainder():
    perm = torch.randperm(103)
    shards = [rank_shard(perm, r, 4) for r in range(4)]
    assert {len(s) for s in shards} == {25}
    assert len(set(torch.cat(shards).tolist())) == 100


def test_low_disk_space_is_refused_before_training(monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 1024))
    with pytest.raises(UserError, match="MiB free in"):
        trainer.check_disk_space(Path(tmp_path) / "not" / "yet", build_model("cnn3"))


def test_our_affine_grid_equals_torch_affine_grid():
    theta = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [16, 1, 28, 20], align_corners=False)
    assert torch.allclose(affine_grid(theta, 16, 28, 20), expected, atol=1e-6)


def test_flip_tta_averages_the_probabilities_of_an_image_and_its_mirror_image():
    torch.manual_seed(0)
    model = build_model("cnn3").eval()
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    plain = Runtime(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25)
    tta = dataclasses.replace(plain, tta_flip=True)
    expected = (predict_logits(model, images, plain, 4).softmax(1)
                + predict_logits(model, images.flip(3), plain, 4).softmax(1)) / 2
    logits = predict_logits(model, images, tta, 4)
    torch.testing.assert_close(logits.softmax(1), expected)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(6))  # log-probabilities: valid logits
    symmetric = torch.cat([images[..., :14], images[..., :14].flip(3)], dim=3)
    torch.testing.assert_close(predict_logits(model, symmetric, tta, 4).softmax(1),
                               predict_logits(model, symmetric, plain, 4).softmax(1))


def test_ema_is_the_moving_average_of_the_weights_after_each_step():
    torch.manual_seed(0)
    model = build_model("cnn3", {"channels": [4, 8, 8], "hidden": 16})
    cfg = Config(ema_decay=0.9, scheduler="none")
    optimizer = build_optimizer(model, cfg, 0.01)
    step = TrainStep(model, optimizer, build_schedulers(optimizer, cfg, 1), torch.amp.GradScaler("cpu", enabled=False),
                     0.0, None, ema=make_ema(model, 0.9), ema_source=model)
    rt = Runtime(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25)
    expected = None
    for _ in range(3):
        step(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), rt)
        now = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        expected = now if expected is None else {k: 0.9 * expected[k] + 0.1 * now[k] for k in now}
    averaged = step.ema.module.state_dict()
    for key, value in expected.items():  # parameters and BatchNorm statistics alike
        torch.testing.assert_close(averaged[key], value)
    assert not torch.equal(averaged["classifier.2.weight"], model.state_dict()["classifier.2.weight"])
    assert make_ema(model, 0.0) is None


def test_flip_tta_logits_stay_finite_for_very_confident_models():
    class Confident(torch.nn.Module):  # logit gaps far beyond what fp32 probabilities can hold
        def forward(self, x):
            return torch.tensor([0.0, 200.0, -200.0] + [0.0] * 7).expand(len(x), 10)

    rt = Runtime(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25, tta_flip=True)
    logits = predict_logits(Confident(), torch.zeros(2, 1, 28, 28, dtype=torch.uint8), rt, 2)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2])))
