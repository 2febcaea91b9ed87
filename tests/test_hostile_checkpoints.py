"""A checkpoint is data, never code or a memory budget: what a crafted or damaged file can no longer do,
and what the user's own module can no longer do to our output."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, run_script, tiny_model

from fashion_ft import model
from fashion_ft.checkpoint import load_checkpoint, make_checkpoint
from fashion_ft.errors import UserError


@pytest.mark.parametrize("script", ["test_model.py", "finetune_gpu.py"])
def test_a_recorded_definition_is_never_imported(tmp_path, script):
    """Any file on the machine, named by path and sha256 in our format's record (loadable with weights_only):
    neither script runs it, and the line that refuses it shows the control characters of its path escaped."""
    target = tmp_path / "any\nthing.py"
    target.write_text("open(__file__ + '.ran', 'w').close()\nclass Net: pass\n")
    crafted = {**make_checkpoint(tiny_model(), "cnn3", TINY), "arch": "user", "model_def": {
        "given": str(target), "resolved": str(target), "class": "Net", "sha256": model.file_sha256(target)}}
    torch.save(crafted, tmp_path / "crafted.pt")
    outputs = ["--output", tmp_path / "o" / "b.pt", "--logdir", tmp_path / "tb"] if script == "finetune_gpu.py" else []
    result = run_script(script, "--model-path", tmp_path / "crafted.pt", "--device", "cpu", *outputs)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    shown = str(target).replace("\n", "\\n")
    refusal = f"a checkpoint never chooses code to run; if you trust the file, pass --model-def '{shown}:Net'"
    with pytest.raises(UserError) as err:  # escaped by the loader itself, not only where a script prints it
        load_checkpoint(tmp_path / "crafted.pt")
    assert refusal in str(err.value) and refusal in result.stdout + result.stderr
    assert not (tmp_path / "any\nthing.py.ran").exists() and not (tmp_path / "o").exists()


def test_a_recorded_width_takes_no_memory(tmp_path):
    """cnn3 with a third stage a million wide took 17 GB before the shapes were compared; under a 6 GiB
    address-space limit it is refused for its size, having allocated nothing."""
    damaged = tmp_path / "damaged.pt"
    shipped = torch.load(REPO / "model" / "mnist_cnn3.pt", weights_only=True)
    torch.save({**shipped, "arch_kwargs": {"channels": [48, 96, 1_000_000]}}, damaged)
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            f"from fashion_ft.checkpoint import load_checkpoint\nload_checkpoint({str(damaged)!r})")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "UserError: " in out.stderr and "the model would have 4,322,046,426 parameters" in out.stderr, out.stderr


def test_a_user_class_is_sized_on_the_meta_device_first(tmp_path):
    """The user's constructor runs with the file's kwargs: over the limit, it never runs for real."""
    net = tmp_path / "net.py"
    net.write_text("import torch\nfrom torch import nn\nclass Net(nn.Module):\n    def __init__(self, hidden):\n"
                   "        super().__init__()\n        self.fc = nn.Linear(784, hidden)\n"
                   "        open(__file__ + '.' + str(torch.empty(0).device), 'w').close()\n")
    torch.save({"fc.weight": torch.zeros(16, 784), "fc.bias": torch.zeros(16)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match="the limit is 1,000,000"):
        load_checkpoint(tmp_path / "w.pt", model_def=model.parse(f"{net}:Net"), model_kwargs={"hidden": 10**6},
                        max_params=10**6)
    assert sorted(p.name for p in tmp_path.glob("net.py.*")) == ["net.py.meta"]


def test_a_zip_that_declares_more_than_it_holds_is_not_loaded(tmp_path, monkeypatch):
    """torch.save stores entries uncompressed; one entry declaring 4 GB is refused before torch.load."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(16)}, path)
    data = bytearray(path.read_bytes())
    # the central directory, after the entries, has one record per entry: the tensor's is the last before its name
    record = data.rindex(b"PK\x01\x02", 0, data.rindex(b"/data/0"))
    struct.pack_into("<I", data, record + 24, 0xFFFF_0000)  # its uncompressed size
    path.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(UserError, match="declares 4,096 MiB of data in a file of"):
        load_checkpoint(path)


def test_the_users_module_neither_waits_for_stdin_nor_breaks_the_json(tmp_path):
    """stdin an open pipe that never closes: input() at import used to wait forever. What the module prints
    (its prompt, a module it imports, its forward) goes to stderr: stdout stays one JSON document."""
    loud = tmp_path / "loud.py"
    loud.write_text("import this\nfrom torch import nn\ntry:\n    input('your name? ')\nexcept EOFError:\n"
                    "    print('stdin at its end')\nclass Loud(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.fc = nn.Linear(784, 10)\n    def forward(self, x):\n"
                    "        print('in forward')\n        return self.fc(x.flatten(1))\n")
    torch.save({"fc.weight": torch.zeros(10, 784), "fc.bias": torch.zeros(10)}, tmp_path / "w.pt")
    reader, writer = os.pipe()
    with open(reader, "rb") as stdin, open(writer, "wb"):
        result = subprocess.run([sys.executable, "test_model.py", "--model-path", tmp_path / "w.pt", "--model-def",
                                 f"{loud}:Loud", "--device", "cpu", "--batches", "1", "--json"], cwd=REPO, stdin=stdin,
                                capture_output=True, text=True, timeout=60)
    assert "checks" in json.loads(result.stdout), result.stdout  # one document, nothing before it
    for printed in ("Beautiful is better than ugly", "your name? stdin at its end", "in forward"):
        assert printed in result.stderr, result.stderr
