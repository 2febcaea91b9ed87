"""Unit tests of the pieces under the training loop: optimizer groups, early stopping, augmentation,
sharding, the EMA, gradient clipping, and what a resume restores (LR schedule, scaler, optimizer)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, tiny_model
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fashion_ft import engine
from fashion_ft.config import Config
from fashion_ft.data import AugmentConfig, DeviceData, affine_grid, augment, make_batch
from fashion_ft.engine import (
    BestTracker,
    ComputeSettings,
    ModelEma,
    TrainStep,
    build_optimizer,
    build_schedulers,
    fused_adamw_supported,
    load_optimizer_state,
    lr_multiplier,
    make_ema,
    predict_logits,
    rank_shard,
    restore_optimization,
)
from fashion_ft.errors import UserError
from fashion_ft.model import apply_freezing, build_model
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
    stopper = BestTracker(monitor, patience=2)
    stopped_at = None
    for epoch, value in enumerate(values, 1):
        stopper.update(value, epoch)
        if stopper.should_stop:
            stopped_at = epoch
            break
    assert stopped_at == stop_after
    assert stopper.best_epoch == 2


def test_min_delta_requires_a_real_improvement():
    stopper = BestTracker("val_acc", patience=5, min_delta=0.01)
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


def test_our_affine_grid_equals_torch_affine_grid():
    theta = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [16, 1, 28, 20], align_corners=False)
    assert torch.allclose(affine_grid(theta, 16, 28, 20), expected, atol=1e-6)


def test_flip_tta_averages_the_probabilities_of_an_image_and_its_mirror_image():
    torch.manual_seed(0)
    model = build_model("cnn3").eval()
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    plain = ComputeSettings(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25)
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
    model = build_model("cnn3", TINY)
    cfg = Config(ema_decay=0.9, scheduler="none")
    optimizer = build_optimizer(model, cfg, 0.01)
    step = TrainStep(model, optimizer, build_schedulers(optimizer, cfg, 1), torch.amp.GradScaler("cpu", enabled=False),
                     0.0, None, ema=make_ema(model, 0.9), ema_source=model)
    rt = ComputeSettings(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25)
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

    rt = ComputeSettings(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25, tta_flip=True)
    logits = predict_logits(Confident(), torch.zeros(2, 1, 28, 28, dtype=torch.uint8), rt, 2)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2])))


CPU = ComputeSettings(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25)


class CountingStep:
    """A stand-in for TrainStep that counts its steps."""

    teachers = None

    def __init__(self):
        self.calls = 0

    def __call__(self, x, y, rt, targets=None):
        self.calls += 1
        return torch.tensor(0.5), torch.zeros(len(y), 10)


@pytest.mark.parametrize("world_size, steps", [(1, 3), (2, 8)], ids=["alone", "torchrun: on_sync decides"])
def test_a_single_process_stops_right_after_the_step_that_set_the_flag(world_size, steps):
    step = CountingStep()
    data = DeviceData.create(torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(64, dtype=torch.long), "cpu")
    rt = dataclasses.replace(CPU, world_size=world_size)
    result = engine.train_one_epoch(step, data, 1, rt, Config(augment="none", batch_size=4, seed=0),
                                    sync_every=100, stop=lambda: step.calls >= 3)
    assert step.calls == steps and result["stopped"] == (world_size == 1) and result["images"] == 4 * steps


def test_model_ema_gives_the_numbers_of_torch_averaged_model():
    torch.manual_seed(0)
    model = tiny_model().train()
    ours = ModelEma(model, 0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update(model)
        reference.update_parameters(model)
    expected = reference.module.state_dict()
    for key, value in ours.module.state_dict().items():
        if value.is_floating_point():  # weights and BatchNorm statistics: bit for bit
            assert torch.equal(value, expected[key]), key
        else:  # num_batches_tracked is a count: copied (AveragedModel averages it in integers)
            assert torch.equal(value, model.state_dict()[key]), key
    assert ours.updates == 4 and isinstance(ours.updates, int)  # a Python counter: no host-device copy
    assert not any(p.requires_grad for p in ours.module.parameters())


def test_model_ema_state_round_trips_and_reads_averaged_model_states():
    torch.manual_seed(0)
    model = tiny_model().train()
    ema = ModelEma(model, 0.5)
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    state = ema.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())  # what a last.pt's "ema" field must hold
    restored = ModelEma(tiny_model().train(), 0.5)
    restored.load_state_dict(state)
    assert restored.updates == 2
    for key, value in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[key], value)
    old = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    old.update_parameters(model)
    from_old = ModelEma(tiny_model().train(), 0.5)
    from_old.load_state_dict(old.state_dict())
    assert from_old.updates == 1
    assert torch.equal(from_old.module.state_dict()["classifier.2.weight"], model.state_dict()["classifier.2.weight"])
    assert set(ema.state_dict()) == set(old.state_dict())  # and ours load into AveragedModel


def test_gradient_clipping_leaves_the_clipped_norm():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    norms = {}
    for max_norm in (None, 0.05):
        torch.manual_seed(1)  # the same weights for both
        model = tiny_model().train()
        cfg = Config(scheduler="none")
        optimizer = build_optimizer(model, cfg, 0.01)
        step = TrainStep(model, optimizer, build_schedulers(optimizer, cfg, 1),
                         torch.amp.GradScaler("cpu", enabled=False), 0.0, max_norm)
        step(x, y, CPU)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms[max_norm] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert norms[None] > 0.1  # the unclipped gradient is larger than the limit ...
    assert norms[0.05] == pytest.approx(0.05, rel=1e-4)  # ... and the step used the clipped one


def test_adamw_is_fused_only_when_every_parameter_is_a_float_on_cuda():
    def param(device, dtype=torch.float32):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert fused_adamw_supported([param("cuda:0"), param("cuda:0", torch.bfloat16), param("cuda:0", torch.float16)])
    assert not fused_adamw_supported([param("cuda:0"), param("cpu")])
    assert not fused_adamw_supported([param("cuda:0", torch.int64)])
    assert not fused_adamw_supported([param("cpu")])


def test_build_optimizer_asks_for_fused_adamw_only_when_supported(monkeypatch):
    optimizer = build_optimizer(tiny_model().train(), Config(), 1e-3)  # on the CPU: torch's default, as before
    assert not any(g["fused"] for g in optimizer.param_groups)
    monkeypatch.setattr(engine, "fused_adamw_supported", lambda params: True)  # as on a CUDA device
    optimizer = build_optimizer(tiny_model().train(), Config(), 1e-3)
    assert all(g["fused"] for g in optimizer.param_groups)


def trained_adamw(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("saved_fused, now_fused", [(None, True), (True, None)])
def test_a_restored_optimizer_keeps_this_runs_implementation(saved_fused, now_fused):
    _, saved = trained_adamw(saved_fused)
    model, optimizer = trained_adamw(now_fused)
    load_optimizer_state(optimizer, saved.state_dict())
    assert optimizer.param_groups[0]["fused"] == now_fused
    for p in model.parameters():
        assert optimizer.state[p]["step"].item() == 2 and optimizer.state[p]["step"].dtype == torch.float32
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # the chosen kernel accepts the restored state


# ---------------------------------------------------------------- resume: LR schedule, scaler

def make_step(cfg, steps_per_epoch, lr, scaler=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = build_optimizer(model, cfg, lr)
    return TrainStep(model, optimizer, build_schedulers(optimizer, cfg, steps_per_epoch),
                     scaler or torch.amp.GradScaler("cpu", enabled=False), 0.0, None)


def advance(step, epochs, monitored=()):
    """`epochs` epochs of optimizer and scheduler steps (no gradients needed for the LR)."""
    for epoch in range(epochs):
        for _ in range(step.schedulers.steps_per_epoch):
            step.optimizer.step()
            step.schedulers.after_batch()
        step.schedulers.after_epoch(monitored[epoch] if monitored else 1.0)


def saved(step):
    return {"optimizer": step.optimizer.state_dict(), "schedulers": step.schedulers.state_dict(),
            "scaler": step.scaler.state_dict(), "ema": None}


def lrs(step):
    return [g["lr"] for g in step.optimizer.param_groups]


@pytest.mark.parametrize("old_steps, new_steps", [(100, 50), (50, 100)])
@pytest.mark.parametrize("warmup, epochs_done", [(0.0, 10), (3.0, 2), (3.0, 10), (0.5, 1)])
def test_lr_after_a_resume_is_the_new_runs_schedule_at_that_epoch(old_steps, new_steps, warmup, epochs_done):
    cfg = Config(epochs=30, scheduler="cosine", warmup_epochs=warmup, lr=0.01)
    old = make_step(cfg, old_steps, cfg.lr)
    advance(old, epochs_done)
    resumed = make_step(cfg, new_steps, cfg.lr)
    restore_optimization(resumed, saved(old), cfg, cfg.lr, epochs_done)
    fresh = make_step(cfg, new_steps, cfg.lr)
    advance(fresh, epochs_done)
    factor = lr_multiplier(cfg, new_steps)(epochs_done * new_steps)
    assert lrs(resumed) == pytest.approx([cfg.lr * factor] * 2, rel=1e-12)
    assert lrs(resumed) == pytest.approx(lrs(fresh), rel=1e-12)
    if (warmup, epochs_done) == (0.0, 10):
        assert factor == pytest.approx(0.75, abs=1e-3)  # 10 of 30 cosine epochs, whatever the steps per epoch
    advance(resumed, 2)
    advance(fresh, 2)
    assert lrs(resumed) == pytest.approx(lrs(fresh), rel=1e-12)  # and it goes on as the fresh schedule


def test_an_overridden_lr_mid_cosine_is_the_new_lr_times_the_schedule():
    cfg = Config(epochs=30, scheduler="cosine", lr=0.01)
    old = make_step(cfg, 40, 0.01)
    advance(old, 12)
    new_cfg = dataclasses.replace(cfg, lr=0.002, weight_decay=0.05)
    resumed = make_step(new_cfg, 40, 0.002)
    restore_optimization(resumed, saved(old), new_cfg, 0.002, 12)
    factor = lr_multiplier(new_cfg, 40)(12 * 40)
    assert 0.3 < factor < 0.9
    assert lrs(resumed) == pytest.approx([0.002 * factor] * 2, rel=1e-12)
    assert resumed.schedulers.per_batch.base_lrs == [0.002, 0.002]
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.05, 0.0]
    advance(resumed, 1)
    assert lrs(resumed)[0] == pytest.approx(0.002 * lr_multiplier(new_cfg, 40)(13 * 40), rel=1e-12)


def test_sgd_momentum_comes_from_the_config_on_resume():
    cfg = Config(optimizer="sgd", scheduler="none", lr=0.1)
    old = make_step(cfg, 10, 0.1)
    advance(old, 1)
    new_cfg = dataclasses.replace(cfg, momentum=0.5)
    resumed = make_step(new_cfg, 10, 0.1)
    restore_optimization(resumed, saved(old), new_cfg, 0.1, 1)
    assert all(g["momentum"] == 0.5 and g["nesterov"] for g in resumed.optimizer.param_groups)


@pytest.mark.parametrize("old_steps, new_steps", [(100, 50), (50, 100)])
def test_plateau_keeps_its_reductions_and_warm_up_follows_the_new_steps(old_steps, new_steps):
    cfg = Config(epochs=30, scheduler="plateau", warmup_epochs=2, plateau_patience=0, plateau_factor=0.5, lr=0.01)
    during = make_step(cfg, old_steps, cfg.lr)
    advance(during, 1)
    resumed = make_step(cfg, new_steps, cfg.lr)
    restore_optimization(resumed, saved(during), cfg, cfg.lr, 1)
    assert lrs(resumed)[0] == pytest.approx(0.01 * (new_steps + 1) / (2 * new_steps), rel=1e-12)
    after = make_step(cfg, old_steps, cfg.lr)
    advance(after, 5, monitored=[1.0, 1.0, 1.0, 2.0, 3.0])  # three epochs without improvement after warm-up
    assert lrs(after)[0] == pytest.approx(0.01 * 0.125)
    new_cfg = dataclasses.replace(cfg, lr=0.004)
    resumed = make_step(new_cfg, new_steps, 0.004)
    restore_optimization(resumed, saved(after), new_cfg, 0.004, 5)
    assert lrs(resumed) == pytest.approx([0.004 * 0.125] * 2, rel=1e-12)
    resumed.schedulers.after_epoch(4.0)  # the restored plateau state: one more bad epoch halves it again
    assert lrs(resumed)[0] == pytest.approx(0.004 * 0.0625, rel=1e-12)


def test_resume_without_a_saved_scaler_state_keeps_the_fresh_scaler():
    cfg = Config(epochs=5, lr=0.01)
    old = make_step(cfg, 10, 0.01)  # a CPU or bf16 run: its scaler was disabled, its state is {}
    advance(old, 1)
    assert saved(old)["scaler"] == {}
    resumed = make_step(cfg, 10, 0.01, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))  # now fp16
    restore_optimization(resumed, saved(old), cfg, 0.01, 1)
    assert resumed.scaler.get_scale() == 2.0**16
    with_state = {**saved(old), "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()}
    restore_optimization(resumed, with_state, cfg, 0.01, 1)
    assert resumed.scaler.get_scale() == 1024.0


def test_resume_restores_the_ema():
    cfg = Config(epochs=5, lr=0.01)
    old = make_step(cfg, 10, 0.01)
    old.ema = make_ema(old.model, 0.9)
    old.ema.update(old.model)
    resumed = make_step(cfg, 10, 0.01)
    resumed.ema = make_ema(resumed.model, 0.9)
    restore_optimization(resumed, {**saved(old), "ema": old.ema.state_dict()}, cfg, 0.01, 1)
    assert resumed.ema.updates == 1


LR_CURVES = {  # scheduler -> (its settings, the LR each of 4 epochs starts with at lr 1e-3)
    "none": ({}, [1e-3] * 4),
    "cosine": ({"min_lr": 0.0}, [1e-3, 1e-3 * (1 + 2 ** -0.5) / 2, 0.5e-3, 1e-3 * (1 - 2 ** -0.5) / 2]),
    "step": ({"step_size": 2, "step_gamma": 0.5}, [1e-3, 1e-3, 5e-4, 5e-4]),
    "exponential": ({"exp_gamma": 0.5}, [1e-3, 5e-4, 2.5e-4, 1.25e-4]),
    "plateau": ({"plateau_patience": 0, "plateau_factor": 0.5}, [1e-3, 1e-3, 5e-4, 2.5e-4]),
}


@pytest.mark.parametrize("scheduler", [*LR_CURVES, "onecycle"])
def test_every_scheduler_gives_its_lr_curve(scheduler):
    """Epoch by epoch as the trainer steps them: after every batch, and with the monitored value after every
    epoch (a validation loss that never improves after the first epoch)."""
    cfg = Config(epochs=4, scheduler=scheduler, warmup_epochs=0, lr=1e-3, **LR_CURVES.get(scheduler, ({},))[0])
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    schedulers = build_schedulers(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(10):
            optimizer.step()
            schedulers.after_batch()
        schedulers.after_epoch(1.0)
    if scheduler == "onecycle":  # from lr/25 up to the peak at 30% of the steps, then down
        assert lrs[0] == pytest.approx(1e-3 / 25) and lrs[1] > lrs[0] and lrs[3] < lrs[2] < 1e-3
    else:
        assert lrs == pytest.approx(LR_CURVES[scheduler][1])


class _Flatten(torch.nn.Module):
    """A user's forward: conv, then `flatten` (any memory format) or `view` (contiguous only) into the head."""

    def __init__(self, flatten: str):
        super().__init__()
        self.conv, self.fc, self.flatten = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 28 * 28, 10), flatten

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.flatten(1) if self.flatten == "flatten" else x.view(x.size(0), -1))


MEMORY_FORMATS = [  # (the forward's flatten, --channels-last, MPS, the format chosen, what the reason says)
    ("flatten", True, False, torch.channels_last, None),
    ("view", True, False, torch.contiguous_format, "its forward fails on channels_last input (view size"),
    ("view", False, False, torch.contiguous_format, None),
    ("flatten", True, True, torch.contiguous_format, "channels_last is off on MPS"),
]


@pytest.mark.parametrize("flatten, wanted, mps, chosen, reason", MEMORY_FORMATS)
def test_channels_last_only_where_the_device_and_the_forward_take_it(monkeypatch, flatten, wanted, mps, chosen, reason):
    monkeypatch.setattr(engine, "channels_last_ok", lambda device: not mps)
    model = _Flatten(flatten)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory_format, why_not = engine.choose_memory_format(model, torch.device("cpu"), wanted)
    assert memory_format == chosen
    assert (why_not is None) == (reason is None) and (reason is None or reason in why_not), why_not
    assert model.training and all(v.is_contiguous() and torch.equal(v, before[k]) for k, v in model.state_dict().items())
