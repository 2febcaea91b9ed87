"""The arch registry: the ResNet's shape, size and FLOPs, recognition of bare weights of both networks, the kwargs
a flag or a file may give, mixed precision, checkpoints, a from-scratch run through the real CLIs."""

import json

import pytest
import torch
from conftest import SMALL_RUN, TINY_RESNET, run_script, tiny_model

from bench.bench_throughput import flops_per_image
from fashion_ft.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fashion_ft.errors import UserError
from fashion_ft.model import ARCHS, build_model, count_parameters, infer_arch


def test_default_is_resnet20_with_option_b_shortcuts():
    model = build_model("resnet")
    assert ARCHS["resnet"].default_kwargs == {"widths": [16, 32, 64], "blocks": 3, "num_classes": 10}
    # counted by hand, conv weights + BatchNorm (gamma, beta) + head:
    #   stem    1*16*9 + 2*16                                            =     176
    #   stage1  3 * (2 * 16*16*9 + 2 * 2*16)                             =  14,016
    #   stage2  16*32*9 + 32*32*9 + 2*2*32 + 16*32 + 2*32  (first block) =  14,528
    #           2 * (2 * 32*32*9 + 2*2*32)                               =  37,120
    #   stage3  32*64*9 + 64*64*9 + 2*2*64 + 32*64 + 2*64  (first block) =  57,728
    #           2 * (2 * 64*64*9 + 2*2*64)                               = 147,968
    #   head    64*10 + 10                                               =     650
    assert count_parameters(model) == (272_186, 272_186)
    convs = [(m.kernel_size[0], m.in_channels, m.out_channels, m.stride[0]) for m in model.modules() if
             isinstance(m, torch.nn.Conv2d)]
    assert sum(c[0] == 3 for c in convs) + 1 == 20  # 19 3x3 convs and the linear head: ResNet-20
    assert [c for c in convs if c[0] == 1] == [(1, 16, 32, 2), (1, 32, 64, 2)]  # the shortcuts (option B)


def test_counted_flops_match_a_hand_count():
    """The benchmark's FLOPs column (torch's FlopCounterMode) is 2 x the multiply-accumulates counted here."""
    macs = (28 * 28 * 8 * 1 * 9                                     # stem
            + 2 * 28 * 28 * 8 * 8 * 9                               # stage1: two 3x3 convs at 28
            + 14 * 14 * 8 * (8 * 9 + 8 * 9 + 8)                     # stage2 at 14: stride-2 conv, conv, 1x1 shortcut
            + 7 * 7 * 16 * (8 * 9 + 16 * 9 + 8)                     # stage3 at 7
            + 16 * 10)                                              # head after global average pooling
    assert flops_per_image(tiny_model("resnet"))["forward"] == 2 * macs == 2 * 1_373_728


@pytest.mark.parametrize("arch, kwargs", [
    ("resnet", ARCHS["resnet"].default_kwargs), ("resnet", TINY_RESNET),
    ("resnet", {"widths": [8, 12], "blocks": 2, "num_classes": 10}),
    ("resnet", {"widths": [6, 6, 12, 24], "blocks": 1, "num_classes": 7}),
    ("resnet", {"widths": [8], "blocks": 2, "num_classes": 4}),
    ("cnn3", {"channels": [8, 16, 32], "hidden": 24, "dropout": 0.3, "num_classes": 10}),
])
def test_each_size_gives_one_score_per_class_and_its_bare_weights_are_recognised(arch, kwargs):
    model = build_model(arch, kwargs)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, kwargs["num_classes"])
    assert infer_arch(model.state_dict()) == (arch, kwargs)


NAMED_LAYER = {f"features.{i}.weight": torch.zeros(8, 8, 3, 3) for i in ("conv", 3, 6)}  # where cnn3 numbers them
NAMED_LAYER.update({"classifier.0.weight": torch.zeros(16, 72), "classifier.out.weight": torch.zeros(10, 16)})


@pytest.mark.parametrize("state_dict, key", [
    ({"encoder.weight": torch.zeros(3, 3), "decoder.weight": torch.zeros(3, 3)}, None), (NAMED_LAYER, None),
    ({"features.0.weight": torch.zeros(0, 1, 3, 3)}, None),
    *((None, key) for key in ["features.stage2.0.conv1.weight", "features.stem.1.running_var",
                              "features.stage3.0.shortcut.0.weight", "classifier.0.bias"]),
])
def test_unknown_weights_are_refused_and_one_damaged_tensor_is_named(state_dict, key):
    """key: a tensor of the tiny ResNet given one more row, which the refusal must name."""
    if key is not None:
        state_dict = tiny_model("resnet").state_dict()
        rows = state_dict[key].shape[0] + 1
        state_dict[key] = torch.zeros(rows, *state_dict[key].shape[1:])
    message = rf"looks like resnet .*{key} has shape \({rows}," if key else "matches no known architecture"
    with pytest.raises(UserError, match=message):
        infer_arch(state_dict)


@pytest.mark.parametrize("arch, kwargs", [
    ("cnn3", {"depth": 3}), ("cnn3", {"channels": [0, 8, 8]}), ("cnn3", {"channels": []}), ("cnn3", {"hidden": 2.5}),
    ("cnn3", {"hidden": True}), ("cnn3", {"dropout": "x"}), ("cnn3", {"dropout": 1}), ("resnet", {"blocks": 0}),
    ("resnet", {"widths": (8, 8)}), ("resnet", {"num_classes": None}), ("vgg", {}),
])
def test_kwargs_our_networks_do_not_take_are_one_user_error(arch, kwargs):
    with pytest.raises(UserError) as info:
        build_model(arch, kwargs)
    assert len(str(info.value).splitlines()) == 1 and info.value.exit_code == 1


def test_channels_last_bf16_autocast_forward_and_backward():
    model = tiny_model("resnet").train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(x)
    assert logits.shape == (4, 10) and logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert torch.isfinite(model.features.stem[0].weight.grad).all()


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model("resnet")
    model.train()(torch.randn(16, 1, 28, 28))  # running statistics that differ from the initial ones
    save_checkpoint(make_checkpoint(model, "resnet", TINY_RESNET), tmp_path / "r.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    x = torch.randn(4, 1, 28, 28)
    for path in (tmp_path / "r.pt", tmp_path / "bare.pt"):  # named by our file, inferred from the bare one
        ckpt = load_checkpoint(path)
        assert (ckpt.arch, ckpt.arch_kwargs) == ("resnet", TINY_RESNET)
        assert torch.equal(ckpt.build().eval()(x), model.eval()(x))


@pytest.mark.slow
def test_from_scratch_preset_and_test_model_on_its_weights(tmp_path, small_data_dir):
    """The from-scratch preset at a tiny width, then test_model.py on the bare weights it wrote."""
    out = tmp_path / "run"
    result = run_script("finetune_gpu.py", "--preset", "resnet20", "--arch-kwargs", json.dumps(TINY_RESNET), "--epochs", 1,
                        "--limit-train", 512, "--data-dir", small_data_dir, "--output", out / "best.pt",
                        "--logdir", tmp_path / "tb", *SMALL_RUN, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert (best["arch"], best["arch_kwargs"]) == ("resnet", TINY_RESNET) and best["config"]["arch_kwargs"] == TINY_RESNET
    assert best["config"]["from_scratch"] and best["config"]["scheduler"] == "onecycle"
    torch.save(best["model"], tmp_path / "bare.pt")  # test_model.py must infer the arch of these
    # one epoch on 512 images is no trained model: the check is that it loads and runs, not its accuracy
    check = run_script("test_model.py", "--model-path", tmp_path / "bare.pt", "--data-dir", small_data_dir,
                       "--device", "cpu", "--min-accuracy", 0, "--json", env={"OMP_NUM_THREADS": "1"})
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    architecture = next(c for c in report["checks"] if c["name"] == "architecture")["data"]
    assert report["passed"] and architecture["arch_kwargs"] == TINY_RESNET
    assert architecture["parameters"] == count_parameters(tiny_model("resnet"))[0]
