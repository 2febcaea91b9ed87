"""TensorBoard is a view of the run, never a reason to lose it: trouble mid-run stops the logging, not the run;
and the per-class test accuracy with its figures (a class the test set lacks, end to end: test_outputs)."""

import json
import re
import subprocess
import sys
import textwrap
import threading
from unittest import mock

import pytest
import torch
from conftest import REPO

from fashion_ft import outputs
from fashion_ft.data import CLASSES

# ---------------------------------------------------------------- TensorBoard trouble mid-run

BREAK_WRITER = textwrap.dedent("""
    import resource, shutil, signal, sys, tempfile, warnings
    warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\\n"  # as the CLI does
    from fashion_ft import outputs

    folder = tempfile.mkdtemp()
    writer = outputs.SafeWriter(folder + "/run")
    outputs.log_config(writer, {"lr": 0.1})
    outputs.log_epoch(writer, 1, {"train_loss": 1.0})
    if sys.argv[1] == "removed":
        shutil.rmtree(folder)
    else:  # a file-size limit fails writes in the kernel as a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    for epoch in range(2, 80):
        outputs.log_epoch(writer, epoch, {"train_loss": 1.0, "val_acc": 0.5, "lr": 0.01})
    outputs.log_hparams(writer, {"lr": 0.1}, {"hparam/test_acc": 0.9})
    print("training went on; logging active:", writer._writer is not None)
    writer.close()
""")


@pytest.mark.parametrize("fault,reason", [("removed", "No such file or directory"), ("full", "File too large")])
def test_a_writer_failure_mid_run_is_one_warning_and_training_goes_on(fault, reason):
    result = subprocess.run([sys.executable, "-c", BREAK_WRITER, fault], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "training went on; logging active: False"
    one_line = f"warning: TensorBoard logging stopped: {reason}.*training goes on\n"  # no "Exception in thread"
    assert re.fullmatch(one_line, result.stderr), result.stderr


@pytest.mark.parametrize("startable", [True, False])
def test_a_writer_logs_or_warns_once_that_it_cannot_start_and_puts_the_thread_hook_back(tmp_path, startable, recwarn):
    (tmp_path / "file").write_text("x")
    logdir, hook = tmp_path / ("run" if startable else "file/run"), threading.excepthook
    writer = outputs.SafeWriter(str(logdir))
    assert threading.excepthook != hook
    outputs.log_epoch(writer, 1, {"train_loss": 1.0, "val_acc": 0.5})
    outputs.log_hparams(writer, {"lr": 0.1}, {"hparam/test_acc": 0.9})
    assert (writer._writer is not None) == startable
    assert [str(w.message) for w in recwarn] == ([] if startable else [
        f"TensorBoard logging stopped: Not a directory (in {logdir}); training goes on"])
    writer.close()
    assert threading.excepthook == hook
    events = list(logdir.glob("events.out.tfevents.*")) if startable else []
    assert len(events) == startable and all(event.stat().st_size > 100 for event in events)


# ---------------------------------------------------------------- per-class test accuracy

def test_a_class_without_test_images_has_no_accuracy_and_an_empty_bar():
    labels, preds = torch.tensor([1, 1, 2, 2, 3]), torch.tensor([1, 2, 2, 9, 4])
    writer = mock.Mock()
    per_class = outputs.log_test_figures(writer, torch.zeros(5, 28, 28, dtype=torch.uint8), labels, preds, CLASSES)
    assert per_class == {**dict.fromkeys(CLASSES), CLASSES[1]: 0.5, CLASSES[2]: 0.5, CLASSES[3]: 0.0}
    assert json.loads(json.dumps(per_class))[CLASSES[0]] is None  # null in metrics.json
    assert {call.args[0] for call in writer.add_scalar.call_args_list} == {
        "test_per_class/Trouser", "test_per_class/Pullover", "test_per_class/Dress"}
    images = {call.args[0]: call.args[1] for call in writer.add_image.call_args_list}
    assert set(images) == {"test/confusion_matrix", "test/per_class_accuracy", "test/misclassified"}
    assert all(image.ndim == 3 and image.shape[2] == 3 for image in images.values())  # HWC, as logged
    bars = [images["test/per_class_accuracy"][5 + i * 20:21 + i * 20, 110:470] for i in range(4)]
    blue = [int((bar == (70, 110, 200)).all(-1).sum()) for bar in bars]
    assert blue[0] == blue[3] < blue[1]  # no test images is drawn as an empty bar, as 0%

