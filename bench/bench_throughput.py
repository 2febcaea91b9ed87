#!/usr/bin/env python
"""Side-by-side throughput of the original recipe and of our training and evaluation paths (issue 4).

One process, one model (fashion_ft "cnn3"), one machine, the same images. Every number is the median
of --repeats timed repeats taken after a warm-up, and the two paths' repeats are interleaved so that
a noisy neighbour slows both alike. Run it from the repository root:

    python bench/bench_throughput.py                            # --device auto
    python bench/bench_throughput.py --device cpu --workers 2 --json bench.json
    python bench/bench_throughput.py --device cpu --threads 1    # on a busy machine, see below
    python bench/bench_throughput.py --tiny                     # a smoke run of seconds; numbers mean nothing

(a) original: torchvision FashionMNIST read from uncompressed IDX files (written here, in torchvision's
    layout, from the same data), per-sample PIL RandomRotation(10) + ToTensor + Normalize, a DataLoader
    with workers, a plain fp32 NCHW model, AdamW.
(b) ours: the uint8 set on the device (DeviceData), batches as index slices, make_batch with the batched
    augmentation, autocast per resolve_amp, channels_last, the package's TrainStep / train_one_epoch,
    and evaluate / predict_logits with a large batch under inference_mode.

On a shared machine the header says how much CPU other processes took while timing. With torch using
every core, a neighbour that takes one of them slows torch's parallel ops several-fold (threads wait
for each other at every op), so there compare with `--threads 1` as well; the "best" columns show the
least disturbed repeat.
"""

import argparse
import copy
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as `python bench/bench_throughput.py` from a fresh clone

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fashion_ft.config import Config  # noqa: E402
from fashion_ft.data import (  # noqa: E402
    AUGMENT_PRESETS,
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    MEAN,
    STD,
    DeviceData,
    batch_slices,
    epoch_permutation,
    find_data_dir,
    make_batch,
    read_split,
)
from fashion_ft.engine import Runtime, TrainStep, build_optimizer, build_schedulers, evaluate, train_one_epoch  # noqa: E402
from fashion_ft.errors import UserError  # noqa: E402
from fashion_ft.model import build_model, count_parameters  # noqa: E402
from fashion_ft.system import (  # noqa: E402
    available_cpus,
    cpu_has_fast_bf16,
    default_eval_batch_size,
    resolve_amp,
    resolve_device,
    set_cpu_threads,
    synchronize,
)

# issue 4's targets; the CUDA ones assume an H100/H200 and the original recipe with 8 workers
TARGETS = {
    "cpu": {"train_speedup": 2.5, "eval_speedup": 3.0, "pipeline_pct": 5.0},
    "cuda": {"train_speedup": 10.0, "epoch_seconds": 1.0},
}
EPOCH_IMAGES = 55_000  # a training epoch with the default 5,000 validation images held out
TINY = {"train": 512, "test": 256, "batch_size": 64, "eval_batch_size": 128, "steps": 3, "repeats": 2}


# ---------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    p.add_argument("--steps", type=int, default=None, help="training steps per repeat (None: 20 on CPU, 100 on CUDA)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps before each path")
    p.add_argument("--workers", type=int, default=None,
                   help="the original recipe's DataLoader workers (None: 8 on CUDA, min(8, cores) on CPU)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch (both) and the original's eval batch")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="our evaluation batch (None: the trainer's default, 256 on CPU, 1024 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both paths (None: the cores available, as the trainer sets; 1 with --tiny)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="our autocast policy")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="our memory format")
    p.add_argument("--augment", choices=sorted(AUGMENT_PRESETS), default="light", help="our augmentation preset")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files (None: search as the trainer does)")
    p.add_argument("--tiny", action="store_true", help="a few steps on a few hundred images (for the tests)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    if min(args.repeats, args.warmup + 1, args.batch_size, args.eval_batch_size or 1) < 1 or (args.steps or 1) < 1:
        p.error("--repeats, --steps, --batch-size and --eval-batch-size must be positive, --warmup >= 0")
    if (args.workers is not None and args.workers < 0) or (args.threads is not None and args.threads < 1):
        p.error("--workers must be >= 0 and --threads >= 1")
    return args


@dataclass
class Bench:
    """The resolved settings both paths share."""

    device: torch.device
    rt: Runtime
    batch_size: int
    eval_batch_size: int
    workers: int
    steps: int
    repeats: int
    warmup: int
    augment: str
    tiny: bool


def resolve_settings(args) -> Bench:
    device = resolve_device(args.device)
    if args.threads or args.tiny:  # tiny: one thread, which a busy machine slows least (its numbers mean nothing)
        torch.set_num_threads(args.threads or 1)
    elif device.type == "cpu":
        set_cpu_threads()  # as the trainer does; the original recipe runs on the same threads
    tiny = TINY if args.tiny else {}
    default_steps = 20 if device.type == "cpu" else 100
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else min(8, available_cpus()))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    rt = Runtime(device, resolve_amp(args.amp, device), MEAN, STD, memory_format)
    return Bench(
        device=device, rt=rt, workers=workers, augment=args.augment, tiny=args.tiny,
        batch_size=tiny.get("batch_size", args.batch_size),
        eval_batch_size=tiny.get("eval_batch_size", args.eval_batch_size or default_eval_batch_size(device)),
        steps=tiny.get("steps", args.steps or default_steps),
        repeats=tiny.get("repeats", args.repeats),
        warmup=min(args.warmup, 1) if args.tiny else args.warmup,
    )


# ---------------------------------------------------------------- the machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import torchvision

    return {
        "cpu": cpu_model(), "cores_available": available_cpus(), "cores_total": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
    }


class CpuShare:
    """How busy the machine's CPUs were with other processes while we ran: on a shared machine the
    numbers below depend on it, so it is printed with them."""

    def __init__(self):
        self.start = (self.machine_ticks(), self.own_seconds(), time.perf_counter())

    @staticmethod
    def machine_ticks() -> tuple[int, int] | None:
        """(busy, total) clock ticks of all CPUs so far, from /proc/stat (Linux)."""
        try:
            with open("/proc/stat") as fh:
                ticks = [int(v) for v in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy

    @staticmethod
    def own_seconds() -> float:
        """CPU seconds of this process and of its children (the DataLoader workers), live or reaped."""
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + CpuShare.live_children_seconds()

    @staticmethod
    def live_children_seconds() -> float:
        """Reaped children are in RUSAGE_CHILDREN; running ones only in /proc/<pid>/stat."""
        total, me = 0, os.getpid()
        for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()  # after "pid (name)"
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == me:  # ppid
                total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict:
        (ticks0, own0, wall0), ticks1 = self.start, self.machine_ticks()
        wall, own = time.perf_counter() - wall0, self.own_seconds() - own0
        out = {"wall_s": wall, "own_cpu_pct": 100 * own / wall / available_cpus()}
        if ticks0 and ticks1:
            hz = os.sysconf("SC_CLK_TCK")
            capacity = (ticks1[1] - ticks0[1]) / hz  # CPU-seconds the machine had
            others = (ticks1[0] - ticks0[0]) / hz - own
            out["others_cpu_pct"] = max(0.0, 100 * others / max(capacity, 1e-9))
        return out


# ---------------------------------------------------------------- timing

@dataclass
class Work:
    """One timed piece of work: run() -> (images, steps); prepare and settle run untimed around it."""

    run: Callable[[], tuple[int, int]]
    prepare: Callable[[], None] = lambda: None
    settle: Callable[[], None] = lambda: None


@dataclass
class Measure:
    """Seconds of each timed repeat of a piece of work that handles `images` images in `steps` steps."""

    images: int = 0
    steps: int = 0
    seconds: list = field(default_factory=list)

    def add(self, work: Work, device) -> None:
        work.prepare()
        synchronize(device)  # CUDA work is asynchronous: time from idle to idle
        start = time.perf_counter()
        images, steps = work.run()
        synchronize(device)
        self.seconds.append(time.perf_counter() - start)
        self.images, self.steps = images, steps
        work.settle()

    @property
    def rate(self) -> float:
        return self.images / statistics.median(self.seconds)

    @property
    def best_rate(self) -> float:
        """The least disturbed repeat: on a shared machine, the closest to what the code can do."""
        return self.images / min(self.seconds)

    @property
    def step_ms(self) -> float:
        return 1000 * statistics.median(self.seconds) / self.steps

    def as_dict(self) -> dict:
        return {"images_per_s": self.rate, "best_images_per_s": self.best_rate, "step_ms": self.step_ms,
                "images": self.images, "steps": self.steps, "seconds": self.seconds}


def interleave(works: dict, repeats: int, device, label: str) -> tuple[dict, dict]:
    """Time each work once per round, in turn, so that drift on a shared machine hits all of them.
    Returns the measures and how busy the machine was meanwhile."""
    measures = {name: Measure() for name in works}
    share = CpuShare()
    for r in range(repeats):
        progress(f"{label}: round {r + 1}/{repeats}")
        for name, work in works.items():
            measures[name].add(work, device)
    return measures, share.stop()


def progress(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data

def load_data(data_dir: str | None, tiny: bool):
    """(train images, train labels, test images, test labels, folder), CPU tensors; --tiny keeps a few."""
    folder = find_data_dir(data_dir, "train")
    train, test = read_split(folder, "train"), read_split(folder, "test")
    if tiny:
        train = (train[0][: TINY["train"]], train[1][: TINY["train"]])
        test = (test[0][: TINY["test"]], test[1][: TINY["test"]])
    return *train, *test, folder


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_torchvision_raw(root: Path, splits: dict) -> None:
    """Uncompressed IDX files in torchvision's layout (<root>/FashionMNIST/raw), as its downloader leaves them."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        image_stem, label_stem = FILES[split]
        write_idx(raw / image_stem, images.numpy(), IMAGES_MAGIC)
        write_idx(raw / label_stem, labels.numpy(), LABELS_MAGIC)


# ---------------------------------------------------------------- (a) the original recipe

def original_loaders(root: Path, bench: Bench):
    """The recipe's per-sample PIL pipeline. Persistent workers, so that steady state is what is timed
    (the recipe re-spawned its workers every epoch, which would only make it slower)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    normalize = transforms.Normalize((MEAN,), (STD,))
    train_tf = transforms.Compose([transforms.RandomRotation(10), transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    common = {"batch_size": bench.batch_size, "num_workers": bench.workers,
              "pin_memory": bench.device.type == "cuda", "persistent_workers": bench.workers > 0}
    train = DataLoader(datasets.FashionMNIST(root, train=True, transform=train_tf), shuffle=True, drop_last=True,
                       **common)
    test = DataLoader(datasets.FashionMNIST(root, train=False, transform=test_tf), shuffle=False, **common)
    return train, test


def endless(loader):
    """Batches across epoch boundaries, so that a repeat can ask for any number of steps."""
    while True:
        yield from loader


class OriginalTrainer:
    """The recipe's loop: DataLoader batches -> device -> fp32 NCHW model -> AdamW.

    Its workers keep prefetch_factor x workers batches ready. Made while the other path is timed, they
    would come free to the next repeat and steal CPU from the other path, so each repeat first takes
    the ready batches untimed (drain) and afterwards waits while the workers refill the queue (settle).
    """

    def __init__(self, model, loader, device):
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.batches = endless(loader)
        self.ready = (loader.prefetch_factor or 0) * loader.num_workers
        self.batch_seconds = 0.0

    def train(self, steps: int):
        start = time.perf_counter()
        self.model.train()
        for _ in range(steps):
            x, y = next(self.batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        # no per-step loss.item(): leaving the recipe's host syncs out only flatters it on CUDA
        synchronize(self.device)
        self.batch_seconds = (time.perf_counter() - start) / steps
        return steps * len(y), steps

    def drain(self) -> None:
        for _ in range(self.ready):
            next(self.batches)

    def settle(self) -> None:
        time.sleep(self.ready * self.batch_seconds)

    def work(self, steps: int) -> Work:
        return Work(lambda: self.train(steps), self.drain, self.settle)


@torch.no_grad()
def original_eval(model, loader, device):
    model.eval()
    correct, seen = torch.zeros((), device=device, dtype=torch.long), 0
    for x, y in loader:
        logits = model(x.to(device, non_blocking=True))
        correct += (logits.argmax(1) == y.to(device, non_blocking=True)).sum()
        seen += len(y)
    correct.item()
    return seen, len(loader)


# ---------------------------------------------------------------- (b) our path

def our_train_step(model, bench: Bench) -> TrainStep:
    """The trainer's TrainStep with the default config (AdamW, cosine schedule)."""
    cfg = Config()
    optimizer = build_optimizer(model, cfg, cfg.lr)
    return TrainStep(model=model, optimizer=optimizer, schedulers=build_schedulers(optimizer, cfg, 1000),
                     scaler=torch.amp.GradScaler(bench.device.type, enabled=bench.rt.amp.use_scaler),
                     label_smoothing=cfg.label_smoothing, max_grad_norm=cfg.max_grad_norm)


def our_train(step: TrainStep, data: DeviceData, aug_name: str, bench: Bench, epoch: int, steps: int):
    """train_one_epoch itself (the trainer's hot loop, its periodic syncs included), stopped after `steps`."""
    step.model.train()
    result = train_one_epoch(step, data, AUGMENT_PRESETS[aug_name], bench.batch_size, seed=0, epoch=epoch,
                             rt=bench.rt, on_sync=lambda done, total, loss: done >= steps,
                             sync_every=min(25, steps))
    return result["images"], result["images"] // bench.batch_size


def our_fixed_batch(step: TrainStep, x, y, bench: Bench, steps: int):
    """Training steps on one ready batch: the model's share of a step, with no loading or augmentation."""
    step.model.train()
    for _ in range(steps):
        step(x, y, bench.rt)
    return steps * len(y), steps


def our_loading(data: DeviceData, aug_name: str, bench: Bench, epoch: int, steps: int):
    """Index slice + make_batch alone, as train_one_epoch does them: the pipeline's own cost."""
    rt, aug = bench.rt, AUGMENT_PRESETS[aug_name]
    gen = torch.Generator(device=rt.device).manual_seed(epoch)
    perm = epoch_permutation(len(data), 0, epoch, rt.device)
    slices = list(batch_slices(len(data), bench.batch_size, drop_last=True))[:steps]
    for sl in slices:
        idx = perm[sl]
        make_batch(data.images[idx], aug, gen, rt.mean, rt.std, rt.memory_format)
        data.labels[idx]
    return len(slices) * bench.batch_size, len(slices)


def our_eval(model, data: DeviceData, bench: Bench):
    """The trainer's evaluate: predict_logits in large batches under inference_mode, loss and accuracy."""
    evaluate(model, data, bench.rt, bench.eval_batch_size)
    return len(data), -(-len(data) // bench.eval_batch_size)


# ---------------------------------------------------------------- arithmetic

def flops_per_image(model) -> dict:
    """Counted, not estimated: forward alone and forward + backward (what a training step computes)."""
    model = copy.deepcopy(model).float().to("cpu", memory_format=torch.contiguous_format)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    forward = counter.get_total_flops() / len(x)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.train()(x), y).backward()
    return {"forward": forward, "train": counter.get_total_flops() / len(x)}


# ---------------------------------------------------------------- the benchmark

def run_training(bench: Bench, models: dict, train_loader, train_data: DeviceData, step: TrainStep,
                 epochs) -> tuple[dict, dict]:
    """Original vs ours, interleaved, after a warm-up of each (which also starts the workers)."""
    original = OriginalTrainer(models["original"], train_loader, bench.device)
    progress("warm-up")
    original.train(bench.warmup + 1)
    our_train(step, train_data, bench.augment, bench, next(epochs), bench.warmup + 1)
    works = {
        "original": original.work(bench.steps),
        "ours": Work(lambda: our_train(step, train_data, bench.augment, bench, next(epochs), bench.steps)),
    }
    measures, share = interleave(works, bench.repeats, bench.device, "training, original vs ours")
    original.settle()  # its workers' prefetch must not overlap the next measurements
    return measures, share


def run_step_parts(bench: Bench, step: TrainStep, data: DeviceData, epochs) -> tuple[dict, dict]:
    """Our step with augmentation on, off, on one ready batch, and the loading + augmentation alone."""
    steps, rt = bench.steps, bench.rt
    idx = epoch_permutation(len(data), 1, 0, bench.device)[: bench.batch_size]
    x = make_batch(data.images[idx], None, None, rt.mean, rt.std, rt.memory_format)
    works = {
        "step_augment": Work(lambda: our_train(step, data, bench.augment, bench, next(epochs), steps)),
        "step_no_augment": Work(lambda: our_train(step, data, "none", bench, next(epochs), steps)),
        "step_fixed_batch": Work(lambda: our_fixed_batch(step, x, data.labels[idx], bench, steps)),
        "loading_augment": Work(lambda: our_loading(data, bench.augment, bench, next(epochs), steps)),
    }
    for work in works.values():  # warm-up: "none" and the ready batch are new shapes of work
        work.run()
    return interleave(works, bench.repeats, bench.device, "our step, its parts")


def run_evaluation(bench: Bench, models: dict, test_loader, test_data: DeviceData) -> tuple[dict, dict]:
    works = {
        "original": Work(lambda: original_eval(models["original"], test_loader, bench.device)),
        "ours": Work(lambda: our_eval(models["ours"], test_data, bench)),
    }
    for work in works.values():  # warm-up; starts the test loader's workers
        work.run()
    return interleave(works, bench.repeats, bench.device, "evaluation, original vs ours")


def make_models(device: torch.device, memory_format) -> dict:
    """The same initial weights for both: the original in plain fp32 NCHW, ours in our memory format."""
    torch.manual_seed(0)
    model = build_model("cnn3")
    return {"original": copy.deepcopy(model).to(device),
            "ours": model.to(device, memory_format=memory_format)}


def run(bench: Bench, data_dir: str | None) -> dict:
    progress("reading the data, writing torchvision's raw files")
    train_x, train_y, test_x, test_y, folder = load_data(data_dir, bench.tiny)
    models = make_models(bench.device, bench.rt.memory_format)
    train_data = DeviceData.create(train_x, train_y, bench.device)
    test_data = DeviceData.create(test_x, test_y, bench.device)
    with tempfile.TemporaryDirectory(prefix="fmnist-tv-") as root:
        write_torchvision_raw(Path(root), {"train": (train_x, train_y), "test": (test_x, test_y)})
        train_loader, test_loader = original_loaders(Path(root), bench)
        step, epochs = our_train_step(models["ours"], bench), itertools.count()  # epochs: a new permutation each
        training, train_share = run_training(bench, models, train_loader, train_data, step, epochs)
        parts, parts_share = run_step_parts(bench, step, train_data, epochs)
        evaluation, eval_share = run_evaluation(bench, models, test_loader, test_data)
        del train_loader, test_loader  # shuts the persistent workers down before the folder goes
    return {"data": {"train": len(train_y), "test": len(test_y), "folder": str(folder)},
            "parameters": count_parameters(models["ours"])[0], "flops": flops_per_image(models["ours"]),
            "training": training | parts, "evaluation": evaluation,
            "cpu_share": {"training": train_share, "step_parts": parts_share, "evaluation": eval_share}}


# ---------------------------------------------------------------- summary

def summarize(bench: Bench, res: dict) -> dict:
    """Ratios, overhead, FLOP/s and the targets, from the medians (and, beside them, the best repeats)."""
    tr, ev, fl = res["training"], res["evaluation"], res["flops"]
    aug_ms = tr["step_augment"].step_ms
    best_ms = {name: 1000 * min(m.seconds) / m.steps for name, m in tr.items()}
    s = {
        "train_speedup": tr["ours"].rate / tr["original"].rate,
        "train_speedup_best": tr["ours"].best_rate / tr["original"].best_rate,
        "eval_speedup": ev["ours"].rate / ev["original"].rate,
        "eval_speedup_best": ev["ours"].best_rate / ev["original"].best_rate,
        "pipeline_pct": 100 * tr["loading_augment"].step_ms / aug_ms,
        "pipeline_pct_best": 100 * best_ms["loading_augment"] / best_ms["step_augment"],
        "augment_cost_pct": 100 * (aug_ms - tr["step_no_augment"].step_ms) / aug_ms,
        "loop_minus_model_pct": 100 * (aug_ms - tr["step_fixed_batch"].step_ms) / aug_ms,
        "epoch_seconds": EPOCH_IMAGES / tr["ours"].rate,
        "epoch_seconds_best": EPOCH_IMAGES / tr["ours"].best_rate,
        "gflops": {f"{phase}_{path}": fl[kind] * res[phase][path].rate / 1e9
                   for phase, kind in (("training", "train"), ("evaluation", "forward"))
                   for path in ("original", "ours")},
    }
    s["targets"] = judge(bench, s)
    return s


LOWER_IS_BETTER = ("pipeline_pct", "epoch_seconds")


def judge(bench: Bench, s: dict) -> dict:
    """{target: wanted, measured (median), met}; none in --tiny, whose numbers are no measurement."""
    if bench.tiny:
        return {}
    out = {}
    for name, wanted in TARGETS.get(bench.device.type, {}).items():
        met = s[name] <= wanted if name in LOWER_IS_BETTER else s[name] >= wanted
        out[name] = {"wanted": wanted, "measured": s[name], "met": met}
    return out


# ---------------------------------------------------------------- report

def verdict(s: dict, name: str) -> str:
    t = s["targets"].get(name)
    if t is None:
        return ""
    sign = "<=" if name in LOWER_IS_BETTER else ">="
    return f"  (target {sign} {t['wanted']:g} on the median: {'met' if t['met'] else 'NOT met'})"


def report_header(bench: Bench, info: dict, res: dict, amp: str) -> None:
    print("== machine ==")
    print(f"cpu: {info['cpu']} ({info['cores_available']} cores available, {info['cores_total']} in the machine; "
          f"torch threads {info['torch_threads']}; avx512_bf16/amx: {'yes' if info['cpu_fast_bf16'] else 'no'})")
    print(f"gpu: {info['gpu'] or 'none'}")
    print(f"torch {info['torch']}, torchvision {info['torchvision']}, python {info['python']}")
    shares = "; ".join(f"{phase} {share_text(share)}" for phase, share in res["cpu_share"].items())
    print(f"other processes' use of the CPUs while timing (they slow both paths): {shares}")
    print("== settings ==")
    print(f"device {bench.device} | amp {amp} | channels_last {bench.rt.memory_format == torch.channels_last} | "
          f"batch {bench.batch_size} | eval batch {bench.eval_batch_size} (original: {bench.batch_size}) | "
          f"DataLoader workers {bench.workers} | median of {bench.repeats} repeats x {bench.steps} steps"
          + (" | TINY: a smoke run, not a measurement" if bench.tiny else ""))
    d, fl = res["data"], res["flops"]
    print(f"data: {d['train']} train + {d['test']} test images (from {d['folder']})")
    print(f"model: cnn3, {res['parameters'] / 1e6:.2f} M parameters; {fl['forward'] / 1e6:.1f} MFLOP/image forward, "
          f"{fl['train'] / 1e6:.1f} MFLOP/image training (forward + backward)")


def share_text(share: dict) -> str:
    return f"{share['others_cpu_pct']:.0f}%" if "others_cpu_pct" in share else "unknown"


def rate_line(label: str, m: Measure) -> str:
    return f"{label:<78} {m.rate:>9,.0f} img/s  (best {m.best_rate:,.0f})"


def report_results(bench: Bench, res: dict, s: dict, amp: str) -> None:
    tr, ev = res["training"], res["evaluation"]
    fmt = "channels_last" if bench.rt.memory_format == torch.channels_last else "NCHW"
    n = bench.repeats
    print("== training: images/s, median of the repeats (best repeat) ==")
    print(rate_line(f"train original: torchvision, PIL RandomRotation(10), DataLoader({bench.workers} workers), "
                    "fp32 NCHW", tr["original"]))
    print(rate_line(f"train ours: uint8 on {bench.device.type}, batched augment {bench.augment}, {amp}, {fmt}",
                    tr["ours"]))
    print(f"train speed-up: {s['train_speedup']:.2f}x  (best-of-{n}: {s['train_speedup_best']:.2f}x)"
          f"{verdict(s, 'train_speedup')}")
    if bench.device.type == "cuda":
        print(f"epoch of {EPOCH_IMAGES:,} images: {s['epoch_seconds']:.2f} s  (best-of-{n}: "
              f"{s['epoch_seconds_best']:.2f} s){verdict(s, 'epoch_seconds')}")
    print("== evaluation ==")
    print(rate_line(f"eval original: DataLoader, batch {bench.batch_size}, fp32 NCHW, no_grad", ev["original"]))
    print(rate_line(f"eval ours: predict_logits, batch {bench.eval_batch_size}, {amp}, {fmt}, inference_mode",
                    ev["ours"]))
    print(f"eval speed-up: {s['eval_speedup']:.2f}x  (best-of-{n}: {s['eval_speedup_best']:.2f}x)"
          f"{verdict(s, 'eval_speedup')}")
    report_step(bench, tr, s)
    g = s["gflops"]
    print("== arithmetic (medians) ==")
    print(f"training: original {g['training_original']:.1f} GFLOP/s, ours {g['training_ours']:.1f} GFLOP/s")
    print(f"evaluation: original {g['evaluation_original']:.1f} GFLOP/s, ours {g['evaluation_ours']:.1f} GFLOP/s")


def report_step(bench: Bench, tr: dict, s: dict) -> None:
    print("== our training step (median; best repeat) ==")
    for name, label in (("step_augment", f"step, augment {bench.augment}"), ("step_no_augment", "step, augment none"),
                        ("step_fixed_batch", "step, one ready batch (no loading, no augment)")):
        m = tr[name]
        print(f"{label + ':':<50} {m.step_ms:8.2f} ms  ({m.rate:,.0f} img/s; best {m.best_rate:,.0f})")
    print(f"load + augment alone: {tr['loading_augment'].step_ms:.2f} ms per batch = {s['pipeline_pct']:.1f}% "
          f"of a training step (best repeats: {s['pipeline_pct_best']:.1f}%){verdict(s, 'pipeline_pct')}")
    print(f"augment on vs off: {s['augment_cost_pct']:+.1f}% of a step; full loop vs ready batch: "
          f"{s['loop_minus_model_pct']:+.1f}% (differences of noisy medians)")


def to_json(bench: Bench, info: dict, res: dict, s: dict, amp: str) -> dict:
    settings = {"device": str(bench.device), "amp": amp, "channels_last": bench.rt.memory_format == torch.channels_last,
                "batch_size": bench.batch_size, "eval_batch_size": bench.eval_batch_size, "workers": bench.workers,
                "steps": bench.steps, "repeats": bench.repeats, "tiny": bench.tiny, "augment": bench.augment}
    return {
        "machine": info, "settings": settings, "cpu_share": res["cpu_share"], "data": res["data"],
        "parameters": res["parameters"], "flops_per_image": res["flops"],
        "training": {k: m.as_dict() for k, m in res["training"].items()},
        "evaluation": {k: m.as_dict() for k, m in res["evaluation"].items()},
        "summary": s,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        bench = resolve_settings(args)
        res = run(bench, args.data_dir)
    except UserError as exc:  # no data, bad device: one line, the scripts' exit codes
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    info, amp = machine_info(bench.device), bench.rt.amp.name
    s = summarize(bench, res)
    report_header(bench, info, res, amp)
    report_results(bench, res, s, amp)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(bench, info, res, s, amp), indent=2))
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
