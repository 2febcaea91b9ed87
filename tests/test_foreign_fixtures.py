"""The foreign networks (tests/foreign.py) are what they claim: a user's script, importable without running
its main, a saved file in the user's format that loads into the user's class, and a model good enough that
a wrong normalisation visibly costs accuracy."""

import pytest
import torch
from foreign import FASHION_NORM, MNIST_NORM, evaluate

MIN_ACCURACY = 0.60  # chance is 0.10; the product's checks need a model that clearly learnt something


@pytest.fixture(params="abcd")
def foreign_net(request, foreign_nets):
    return foreign_nets(request.param)


def load_model(net):
    """Load the saved file as a user would, into a fresh instance of the user's class."""
    saved = torch.load(net.weights, weights_only=True)
    if net.container == "model_state_dict":
        assert set(saved) == {"model_state_dict", "epoch"}
        saved = saved["model_state_dict"]
        assert all(key.startswith("module.") for key in saved), "saved from nn.DataParallel"
        saved = {key.removeprefix("module."): value for key, value in saved.items()}
    model = net.load_class()(**net.kwargs)
    model.load_state_dict(saved)
    return model


def test_foreign_network(foreign_net, small_splits):
    net = foreign_net
    assert net.file.is_file() and net.file.parent == net.weights.parent
    assert not net.marker.exists(), "importing the script ran its main()"
    assert not (net.file.parent / "__pycache__").exists()
    model = load_model(net)
    assert not net.marker.exists()
    assert net.accuracy >= MIN_ACCURACY, f"{net.name}: {net.accuracy:.3f}"
    # the saved file is the model that was measured
    assert evaluate(model, *small_splits[2:], net.mean, net.std) == pytest.approx(net.accuracy)
    if (net.mean, net.std) == MNIST_NORM:  # (a): measured with Fashion-MNIST's normalisation, clearly worse
        wrong = evaluate(model, *small_splits[2:], *FASHION_NORM)
        assert wrong <= net.accuracy - 0.10, f"MNIST normalisation {net.accuracy:.3f}, Fashion-MNIST's {wrong:.3f}"
