"""Unit tests of the pieces under the training loop: optimizer groups, early stopping, augmentation,
sharding, the EMA, gradient clipping, and what a resume restores (LR schedule, scaler, optimizer)."""

import dataclasses
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fashion_ft import engine
from fashion_ft.config import Config
from fashion_ft.data import AugmentConfig, DeviceData, affine_grid, augment, make_batch
from fashion_ft.errors import UserError
from fashion_ft.model import apply_freezing, build_model
from fashion_ft.system import AmpPolicy

CPU = engine.ComputeSettings(torch.device("cpu"), AmpPolicy(None, False), 0.5, 0.25)


def make_step(cfg, steps_per_epoch, scaler=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = engine.build_optimizer(model, cfg, cfg.lr)
    return engine.TrainStep(model, optimizer, engine.build_schedulers(optimizer, cfg, steps_per_epoch),
                            scaler or torch.amp.GradScaler("cpu", enabled=False), 0.0, None)


@pytest.mark.parametrize("optimizer, kind, weight_decay, momentum", [
    ("adamw", torch.optim.AdamW, 0.01, None), ("sgd", torch.optim.SGD, 5e-4, 0.9)])
def test_the_optimizer_trains_the_trainable_without_decay_on_biases_and_norms(optimizer, kind, weight_decay, momentum):
    model = build_model("cnn3")
    apply_freezing(model, freeze_conv=True, freeze_bn=False)
    opt = engine.build_optimizer(model, Config(optimizer=optimizer), lr=1e-3)
    decay, no_decay = opt.param_groups
    assert isinstance(opt, kind)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.classifier.parameters()}
    assert decay["weight_decay"] == weight_decay and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert decay.get("momentum") == momentum and decay.get("nesterov", False) == (momentum is not None)
    with pytest.raises(UserError, match="nothing to train"):
        engine.build_optimizer(model.requires_grad_(False), Config(optimizer=optimizer), lr=1e-3)


@pytest.mark.parametrize("monitor, min_delta, values, new_bests", [
    ("val_acc", 0.0, [0.5, 0.6, 0.6, 0.59], [True, True, False, False]),  # equal is no improvement
    ("val_loss", 0.0, [1.0, 0.9, 0.9, 0.91], [True, True, False, False]),
    ("val_acc", 0.01, [0.8, 0.805, 0.82, 0.825, 0.829], [True, False, True, False, False]),  # by min_delta or more
])
def test_the_tracker_stops_after_patience_epochs_without_improvement(monitor, min_delta, values, new_bests):
    tracker = engine.BestTracker(monitor, patience=2, min_delta=min_delta)
    seen = [(tracker.update(value, epoch), tracker.should_stop) for epoch, value in enumerate(values, 1)]
    assert seen == [(new, epoch == len(values)) for epoch, new in enumerate(new_bests, 1)]
    assert tracker.best_epoch == max(epoch for epoch, new in enumerate(new_bests, 1) if new)


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
    assert torch.equal(a, augment(images.clone(), aug, torch.Generator().manual_seed(1)))
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
    batch = make_batch(torch.full((4, 1, 28, 28), 255, dtype=torch.uint8), None, None, 0.5, 0.25, torch.channels_last)
    assert torch.allclose(batch, torch.full_like(batch, 2.0))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_rank_shards_are_disjoint_equal_and_cover_all_but_the_remainder():
    perm = torch.randperm(103)
    shards = [engine.rank_shard(perm, r, 4) for r in range(4)]
    assert {len(s) for s in shards} == {25} and len(set(torch.cat(shards).tolist())) == 100


def test_our_affine_grid_equals_torch_affine_grid():
    theta = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [16, 1, 28, 20], align_corners=False)
    assert torch.allclose(affine_grid(theta, 16, 28, 20), expected, atol=1e-6)


def test_flip_tta_averages_the_probabilities_of_an_image_and_its_mirror_image():
    torch.manual_seed(0)
    model = build_model("cnn3").eval()
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    plain, tta = CPU, dataclasses.replace(CPU, tta_flip=True)
    expected = (engine.predict_logits(model, images, plain, 4).softmax(1)
                + engine.predict_logits(model, images.flip(3), plain, 4).softmax(1)) / 2
    logits = engine.predict_logits(model, images, tta, 4)
    torch.testing.assert_close(logits.softmax(1), expected)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(6))  # log-probabilities: valid logits
    confident = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    torch.nn.init.zeros_(confident[1].weight)
    confident[1].bias.data = torch.tensor([0.0, 200.0, -200.0] + [0.0] * 7)  # gaps beyond fp32 probabilities
    logits = engine.predict_logits(confident, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), tta, 2)
    assert torch.isfinite(logits).all()  # averaged in log space
    assert torch.isfinite(torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2])))


@pytest.mark.parametrize("world_size, steps", [(1, 3), (2, 8)], ids=["alone", "torchrun: on_sync decides"])
def test_a_single_process_stops_right_after_the_step_that_set_the_flag(world_size, steps):
    step = mock.Mock(teachers=None, side_effect=lambda x, y, *_: (torch.tensor(0.5), torch.zeros(len(y), 10)))
    data = DeviceData.create(torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(64, dtype=torch.long), "cpu")
    rt = dataclasses.replace(CPU, world_size=world_size)
    result = engine.train_one_epoch(step, data, 1, rt, Config(augment="none", batch_size=4, seed=0),
                                    sync_every=100, stop=lambda: step.call_count >= 3)
    assert step.call_count == steps and result["stopped"] == (world_size == 1) and result["images"] == 4 * steps


def test_the_steps_moving_average_gives_the_numbers_of_torch_averaged_model_and_shares_its_state():
    step = make_step(Config(scheduler="none", lr=0.1), 1)
    step.ema, step.ema_source = engine.make_ema(step.model, 0.9), step.model
    reference = AveragedModel(step.model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(4):
        step(torch.randn(8, 4), torch.randint(0, 4, (8,)), CPU)
        reference.update_parameters(step.model)  # after the optimizer's step: the weights it made
    expected = reference.module.state_dict()
    for key, value in step.ema.module.state_dict().items():
        if value.is_floating_point():  # weights and BatchNorm statistics: bit for bit
            assert torch.equal(value, expected[key]), key
        else:  # num_batches_tracked is a count: copied (AveragedModel averages it in integers)
            assert torch.equal(value, step.model.state_dict()[key]), key
    assert step.ema.updates == 4 and isinstance(step.ema.updates, int)  # a Python counter: no host-device copy
    assert not any(p.requires_grad for p in step.ema.module.parameters())
    state = step.ema.state_dict()  # a last.pt's "ema": tensors only, in AveragedModel's layout
    assert set(state) == set(reference.state_dict()) and all(torch.is_tensor(v) for v in state.values())
    for source in (step.ema, reference):  # ours round-trips, and an AveragedModel's state loads
        restored = engine.ModelEma(step.model, 0.9)
        restored.load_state_dict(source.state_dict())
        assert restored.updates == 4
        assert all(torch.equal(v, source.module.state_dict()[k]) for k, v in restored.module.state_dict().items())
    assert engine.make_ema(step.model, 0.0) is None


def test_gradient_clipping_leaves_the_clipped_norm():
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3] * 2)
    norms = {}
    for max_norm in (None, 0.05):
        step = make_step(Config(scheduler="none", lr=0.01), 1)  # the same weights for both
        step.max_grad_norm = max_norm
        step(x, y, CPU)
        grads = [p.grad.flatten() for p in step.model.parameters()]
        norms[max_norm] = torch.linalg.vector_norm(torch.cat(grads)).item()
    assert norms[None] > 0.1  # the unclipped gradient is larger than the limit ...
    assert norms[0.05] == pytest.approx(0.05, rel=1e-4)  # ... and the step used the clipped one


@pytest.mark.parametrize("params, fused", [
    ([("cuda:0", torch.float32), ("cuda:0", torch.bfloat16), ("cuda:0", torch.float16)], True),
    ([("cuda:0", torch.float32), ("cpu", torch.float32)], False), ([("cuda:0", torch.int64)], False),
    ([("cpu", torch.float32)], False),  # on the CPU: torch's default
])
def test_adamw_is_fused_only_when_every_parameter_is_a_float_on_cuda(params, fused):
    assert engine.fused_adamw_supported([SimpleNamespace(device=torch.device(d), dtype=t) for d, t in params]) is fused


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_restored_optimizer_keeps_this_runs_implementation(monkeypatch, saved_fused):
    """build_optimizer fuses AdamW where fused_adamw_supported says so, and a resume keeps that choice."""
    def trained(fused):
        monkeypatch.setattr(engine, "fused_adamw_supported", lambda params: fused)  # fused: as on a CUDA device
        step = make_step(Config(), 1)
        for _ in range(2):
            step(torch.randn(8, 4), torch.randint(0, 4, (8,)), CPU)
        return step

    old, step = trained(saved_fused), trained(not saved_fused)
    engine.load_optimizer_state(step.optimizer, old.optimizer.state_dict())
    assert all(bool(g["fused"]) != saved_fused for g in step.optimizer.param_groups)
    assert all(s["step"].item() == 2 and s["step"].dtype == torch.float32 for s in step.optimizer.state.values())
    step(torch.randn(8, 4), torch.randint(0, 4, (8,)), CPU)  # the chosen kernel accepts the restored state


# ---------------------------------------------------------------- resume: LR schedule, scaler

def advance(step, epochs, monitored=()):
    """`epochs` epochs of optimizer and scheduler steps (no gradients needed for the LR)."""
    for epoch in range(epochs):
        for _ in range(step.schedulers.steps_per_epoch):
            step.optimizer.step()
            step.schedulers.after_batch()
        step.schedulers.after_epoch(monitored[epoch] if monitored else 1.0)


def saved(step):
    return {"optimizer": step.optimizer.state_dict(), "schedulers": step.schedulers.state_dict(),
            "scaler": step.scaler.state_dict(), "ema": step.ema and step.ema.state_dict()}


def lrs(step):
    return [g["lr"] for g in step.optimizer.param_groups]


@pytest.mark.parametrize("old_steps, new_steps", [(100, 50), (50, 100)])
@pytest.mark.parametrize("scheduler, warmup, epochs_done", [  # plateau: its warm-up follows the new steps too
    ("cosine", 0.0, 10), ("cosine", 3.0, 2), ("cosine", 3.0, 10), ("cosine", 0.5, 1), ("plateau", 2.0, 1)])
def test_lr_after_a_resume_is_the_new_runs_schedule_at_that_epoch(old_steps, new_steps, scheduler, warmup, epochs_done):
    cfg = Config(epochs=30, scheduler=scheduler, warmup_epochs=warmup, lr=0.01)
    old, fresh = make_step(cfg, old_steps), make_step(cfg, new_steps)
    advance(old, epochs_done)
    advance(fresh, epochs_done)
    resumed = make_step(cfg, new_steps)
    engine.restore_optimization(resumed, saved(old), cfg.lr, epochs_done)
    for _ in range(2):  # at that epoch, and as the fresh schedule goes on
        assert lrs(resumed) == pytest.approx(lrs(fresh), rel=1e-12)
        advance(resumed, 2)
        advance(fresh, 2)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_overridden_settings_mid_cosine_are_the_resumed_runs(optimizer):
    """A new LR times the schedule at its place; weight decay and momentum from the config, not the file."""
    cfg = Config(epochs=30, scheduler="cosine", lr=0.01, optimizer=optimizer)
    old = make_step(cfg, 40)
    advance(old, 12)
    new_cfg = dataclasses.replace(cfg, lr=0.002, weight_decay=0.05, momentum=0.5)
    resumed = make_step(new_cfg, 40)
    engine.restore_optimization(resumed, saved(old), 0.002, 12)
    factor = engine.lr_multiplier(new_cfg, 40)(12 * 40)
    assert 0.3 < factor < 0.9 and lrs(resumed) == pytest.approx([0.002 * factor] * 2, rel=1e-12)
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.05, 0.0]
    assert all(g.get("momentum", 0.5) == 0.5 and g.get("nesterov", True) for g in resumed.optimizer.param_groups)
    advance(resumed, 1)
    assert lrs(resumed)[0] == pytest.approx(0.002 * engine.lr_multiplier(new_cfg, 40)(13 * 40), rel=1e-12)


@pytest.mark.parametrize("old_steps, new_steps", [(100, 50), (50, 100)])
def test_plateau_keeps_its_reductions_after_a_resume(old_steps, new_steps):
    cfg = Config(epochs=30, scheduler="plateau", warmup_epochs=2, plateau_patience=0, plateau_factor=0.5, lr=0.01)
    after = make_step(cfg, old_steps)
    advance(after, 5, monitored=[1.0, 1.0, 1.0, 2.0, 3.0])  # three epochs without improvement after warm-up
    assert lrs(after)[0] == pytest.approx(0.01 * 0.125)
    new_cfg = dataclasses.replace(cfg, lr=0.004)
    resumed = make_step(new_cfg, new_steps)
    engine.restore_optimization(resumed, saved(after), 0.004, 5)
    assert lrs(resumed) == pytest.approx([0.004 * 0.125] * 2, rel=1e-12)
    resumed.schedulers.after_epoch(4.0)  # the restored plateau state: one more bad epoch halves it again
    assert lrs(resumed)[0] == pytest.approx(0.004 * 0.0625, rel=1e-12)


def test_resume_restores_a_saved_scaler_and_ema_and_keeps_fresh_ones_without():
    cfg = Config(epochs=5, lr=0.01)
    old = make_step(cfg, 10)  # a CPU or bf16 run: its scaler was disabled, its state is {}
    assert saved(old)["scaler"] == {} and saved(old)["ema"] is None
    resumed = make_step(cfg, 10, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))  # now fp16
    resumed.ema = engine.make_ema(resumed.model, 0.9)
    engine.restore_optimization(resumed, saved(old), 0.01, 1)
    assert resumed.scaler.get_scale() == 2.0**16 and resumed.ema.updates == 0
    old.scaler, old.ema = torch.amp.GradScaler("cpu", init_scale=1024.0), engine.make_ema(old.model, 0.9)
    old.ema.update(old.model)
    engine.restore_optimization(resumed, saved(old), 0.01, 1)
    assert resumed.scaler.get_scale() == 1024.0 and resumed.ema.updates == 1


LR_CURVES = {  # scheduler -> (its settings, the LR each of 4 epochs starts with at lr 1e-3)
    "none": ({}, [1e-3] * 4),
    "cosine": ({"min_lr": 0.0}, [1e-3, 1e-3 * (1 + 2 ** -0.5) / 2, 0.5e-3, 1e-3 * (1 - 2 ** -0.5) / 2]),
    "step": ({"step_size": 2, "step_gamma": 0.5}, [1e-3, 1e-3, 5e-4, 5e-4]),
    "exponential": ({"exp_gamma": 0.5}, [1e-3, 5e-4, 2.5e-4, 1.25e-4]),
    "plateau": ({"plateau_patience": 0, "plateau_factor": 0.5}, [1e-3, 1e-3, 5e-4, 2.5e-4]),
}


@pytest.mark.parametrize("scheduler", [*LR_CURVES, "onecycle"])
def test_every_scheduler_gives_its_lr_curve(scheduler):
    """Stepped as the trainer does, with a validation loss that never improves after the first epoch."""
    cfg = Config(epochs=4, scheduler=scheduler, warmup_epochs=0, lr=1e-3, **LR_CURVES.get(scheduler, ({},))[0])
    step, curve = make_step(cfg, 10), []
    for _ in range(cfg.epochs):
        curve.append(lrs(step)[0])
        advance(step, 1)
    if scheduler == "onecycle":  # from lr/25 up to the peak at 30% of the steps, then down
        assert curve[0] == pytest.approx(1e-3 / 25) and curve[1] > curve[0] and curve[3] < curve[2] < 1e-3
    else:
        assert curve == pytest.approx(LR_CURVES[scheduler][1])


class View(torch.nn.Module):  # a user's flatten: `view` takes contiguous input only, nn.Flatten any layout
    def forward(self, x):
        return x.view(x.size(0), -1)


MEMORY_FORMATS = [  # (the forward's flatten, --channels-last, MPS, the format chosen, what the reason says)
    (torch.nn.Flatten(), True, False, torch.channels_last, None),
    (View(), True, False, torch.contiguous_format, "its forward fails on channels_last input (view size"),
    (View(), False, False, torch.contiguous_format, None),
    (torch.nn.Flatten(), True, True, torch.contiguous_format, "channels_last is off on MPS"),
]


@pytest.mark.parametrize("flatten, wanted, mps, chosen, reason", MEMORY_FORMATS)
def test_channels_last_only_where_the_device_and_the_forward_take_it(monkeypatch, flatten, wanted, mps, chosen, reason):
    monkeypatch.setattr(engine, "channels_last_ok", lambda device: not mps)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), flatten, torch.nn.Linear(4 * 28 * 28, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory_format, why_not = engine.choose_memory_format(model, torch.device("cpu"), wanted)
    assert memory_format == chosen
    assert (why_not is None) == (reason is None) and (reason is None or reason in why_not), why_not
    assert model.training  # the probe was a copy: the model itself is left as it was
    assert all(v.is_contiguous() and torch.equal(v, before[k]) for k, v in model.state_dict().items())
