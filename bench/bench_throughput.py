"""Throughput of the original training recipe against this package's training and evaluation paths.

One process, one model, the same images; every figure is the median of --repeats timed repeats after a
warm-up, the paths' repeats interleaved so that a noisy neighbour slows them alike. From the repository root:

    python -m bench.bench_throughput --device cpu --workers 2 --json bench.json
    python -m bench.bench_throughput --tiny          # seconds; its numbers mean nothing
    python -m bench.bench_throughput --model-def bench/own_model/mnist-gpu.py:Net   # your own network
    python -m bench.bench_throughput --teacher model/resnet20.pt   # our step with and without a teacher

original: torchvision FashionMNIST from uncompressed IDX files (written here in torchvision's layout),
    per-sample PIL RandomRotation(10) + ToTensor + Normalize, a DataLoader with workers, fp32 NCHW, AdamW.
ours: the uint8 set on the device (DeviceData), index-slice batches, make_batch's batched augmentation,
    autocast per resolve_amp, channels_last, TrainStep / train_one_epoch, evaluate / predict_logits.

With torch on every core, a neighbour that takes one core slows torch's parallel ops several-fold:
the load average is printed with the numbers; on a busy machine compare with `--threads 1` as well.
"""

import argparse
import copy
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fashion_ft import config, model
from fashion_ft.checkpoint import load_checkpoint
from fashion_ft.config import Config
from fashion_ft.data import (
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
    write_idx,
)
from fashion_ft.engine import (
    ComputeSettings,
    Teacher,
    Teachers,
    TrainStep,
    build_optimizer,
    build_schedulers,
    choose_memory_format,
    evaluate,
    train_one_epoch,
)
from fashion_ft.model import ARCHS, INPUT_SHAPE, build_source, count_parameters, resolve_arch_kwargs
from fashion_ft.system import (
    AMP_MODES,
    available_cpus,
    cpu_info,
    default_eval_batch_size,
    resolve_amp,
    resolve_device,
    set_cpu_threads,
    synchronize,
)

EPOCH_IMAGES = 55_000  # a training epoch with the default 5,000 validation images held out
MATMUL_SIZE = 1024
TINY = {"train": 512, "test": 256, "batch_size": 64, "eval_batch_size": 128, "steps": 3, "repeats": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--arch", choices=sorted(ARCHS), default="cnn3", help="the model both paths train")
    config.add_shared(p, "--model-def", "--model-kwargs", "--normalize")  # your own network instead
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    p.add_argument("--steps", type=int, default=None, help="training steps per repeat (None: 20 on CPU, 100 on CUDA)")
    p.add_argument("--workers", type=int, default=None,
                   help="the original recipe's DataLoader workers (None: 8 on CUDA, min(8, cores) on CPU)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch (both) and the original's eval batch")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="our evaluation batch (None: the trainer's default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both paths (None: the cores available, as the trainer sets; "
                        "1 with --tiny)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="our autocast policy")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="our memory format")
    p.add_argument("--augment", choices=sorted(AUGMENT_PRESETS), default="light", help="our augmentation preset")
    p.add_argument("--data-dir", default=None,
                   help="folder with the Fashion-MNIST IDX files (None: as the trainer searches)")
    p.add_argument("--teacher", nargs="+", default=None, metavar="PATH",
                   help="also time our step distilling from these checkpoints (finetune_gpu.py's --teacher)")
    p.add_argument("--tiny", action="store_true", help="a few steps on a few hundred images (for the tests)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    args = p.parse_args(argv)
    if min(args.repeats, args.batch_size, args.eval_batch_size or 1, args.steps or 1, args.threads or 1) < 1:
        p.error("--repeats, --steps, --batch-size, --eval-batch-size and --threads must be positive")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json {args.json}: its folder does not exist")
    return args


@dataclass
class Bench:
    """The resolved settings both paths share."""

    device: torch.device
    rt: ComputeSettings
    model_name: str
    build: Callable[[], torch.nn.Module]  # a fresh model, the same weights for a given torch seed
    batch_size: int
    eval_batch_size: int
    workers: int
    steps: int
    repeats: int
    augment: str
    tiny: bool
    teachers: Teachers | None = None  # --teacher: the step is also timed with them


def load_teachers(paths: list[str] | None, rt: ComputeSettings, channels_last: bool) -> Teachers | None:
    """The trainer's teachers: our checkpoints on the device, each in its own memory format, at T 1."""
    if not paths:
        return None
    teachers = []
    for path in paths:
        ckpt = load_checkpoint(path, ours_only=True)
        model = ckpt.build().eval().requires_grad_(False)
        memory_format, _ = choose_memory_format(model, rt.device, channels_last)
        teachers.append(Teacher(model.to(rt.device, memory_format=memory_format), ckpt.mean, ckpt.std, memory_format))
    return Teachers(teachers, 1.0, sources=[])


def resolve_settings(args) -> Bench:
    device = resolve_device(args.device)
    if args.threads or args.tiny:  # tiny: one thread, which a busy machine slows least
        torch.set_num_threads(args.threads or 1)
    elif device.type == "cpu":
        set_cpu_threads()  # as the trainer does; the original recipe runs on the same threads
    tiny = TINY if args.tiny else {}
    default_workers = 8 if device.type == "cuda" else min(8, available_cpus())
    definition = model.parse(args.model_def) if args.model_def else None
    kwargs = (args.model_kwargs or {}) if definition else resolve_arch_kwargs(args.arch)
    build = functools.partial(build_source, args.arch, kwargs, definition)
    memory_format, why_not = choose_memory_format(build(), device, args.channels_last)
    if why_not:
        print(why_not, file=sys.stderr)
    mean, std = args.normalize or (MEAN, STD)
    rt = ComputeSettings(device, resolve_amp(args.amp, device), mean, std, memory_format)
    return Bench(
        device=device, rt=rt, teachers=load_teachers(args.teacher, rt, args.channels_last),
        model_name=args.model_def or args.arch, build=build, augment=args.augment, tiny=args.tiny,
        workers=default_workers if args.workers is None else args.workers,
        batch_size=tiny.get("batch_size", args.batch_size),
        eval_batch_size=tiny.get("eval_batch_size", args.eval_batch_size or default_eval_batch_size(device)),
        steps=tiny.get("steps", args.steps or (20 if device.type == "cpu" else 100)),
        repeats=tiny.get("repeats", args.repeats),
    )


@dataclass
class Work:
    """One timed piece of work: run() -> (images, steps), timed once per call of time(); prepare and settle
    run untimed around it."""

    label: str
    run: Callable[[], tuple[int, int]]
    prepare: Callable[[], None] = lambda: None
    settle: Callable[[], None] = lambda: None
    counts: tuple = (0, 0)  # (images, steps) of the last timed run
    seconds: list = field(default_factory=list)

    def time(self, device) -> None:
        self.prepare()
        synchronize(device)  # CUDA work is asynchronous: time from idle to idle
        start = time.perf_counter()
        self.counts = self.run()
        synchronize(device)
        self.seconds.append(time.perf_counter() - start)
        self.settle()

    def as_dict(self, flops_per_image: float | None) -> dict:
        (images, steps), median = self.counts, statistics.median(self.seconds)
        rate = images / median
        return {"label": self.label, "images_per_s": rate, "step_ms": 1000 * median / steps,
                "gflop_per_s": None if flops_per_image is None else flops_per_image * rate / 1e9,
                "images": images, "steps": steps, "seconds": self.seconds}


def write_torchvision_raw(root: Path, splits: dict) -> None:
    """Uncompressed IDX files in torchvision's layout (<root>/FashionMNIST/raw), as its downloader leaves them."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, tensors in splits.items():
        for stem, tensor, magic in zip(FILES[split], tensors, (IMAGES_MAGIC, LABELS_MAGIC)):
            write_idx(raw / stem, tensor.numpy(), magic)


class OriginalTrainer:
    """The recipe's loop: per-sample PIL DataLoader batches -> device -> fp32 NCHW model -> AdamW.

    Persistent workers, so that steady state is what is timed (the recipe re-spawned its workers every epoch,
    which would only make it slower). They keep prefetch_factor x workers batches ready; made while the other
    path is timed, those would come free to the next repeat and steal CPU from the other path, so each repeat
    first takes the ready batches untimed and afterwards waits while the workers refill the queue.
    """

    def __init__(self, model, root: Path, bench: Bench):
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        normalize = transforms.Normalize((bench.rt.mean,), (bench.rt.std,))
        train_tf = transforms.Compose([transforms.RandomRotation(10), transforms.ToTensor(), normalize])
        test_tf = transforms.Compose([transforms.ToTensor(), normalize])
        loader = functools.partial(DataLoader, batch_size=bench.batch_size, num_workers=bench.workers,
                                   pin_memory=bench.device.type == "cuda", persistent_workers=bench.workers > 0)
        train = loader(datasets.FashionMNIST(root, train=True, transform=train_tf), shuffle=True, drop_last=True)
        self.test = loader(datasets.FashionMNIST(root, train=False, transform=test_tf), shuffle=False)
        self.model, self.device = model, bench.device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.batches = itertools.chain.from_iterable(itertools.repeat(train))  # across epochs, for any steps
        self.ready = (train.prefetch_factor or 0) * train.num_workers
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

    def train_work(self, label: str, steps: int) -> Work:
        return Work(label, lambda: self.train(steps), prepare=lambda: list(itertools.islice(self.batches, self.ready)),
                    settle=lambda: time.sleep(self.ready * self.batch_seconds))

    @torch.no_grad()
    def eval(self):
        self.model.eval()
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for x, y in self.test:
            logits = self.model(x.to(self.device, non_blocking=True))
            correct += (logits.argmax(1) == y.to(self.device, non_blocking=True)).sum()
        correct.item()
        return len(self.test.dataset), len(self.test)


class Ours:
    """The trainer's TrainStep with the default config (AdamW, cosine schedule) and the package's loops."""

    def __init__(self, model, bench: Bench):
        cfg = Config()
        optimizer = build_optimizer(model, cfg, cfg.lr)
        self.step = TrainStep(model=model, optimizer=optimizer, schedulers=build_schedulers(optimizer, cfg, 1000),
                              scaler=torch.amp.GradScaler(bench.device.type, enabled=bench.rt.amp.use_scaler),
                              label_smoothing=cfg.label_smoothing, max_grad_norm=cfg.max_grad_norm)
        self.bench, self.epochs = bench, itertools.count()  # a new permutation for every call
        self.taught = copy.copy(self.step)
        self.taught.teachers, self.taught.kd_alpha = bench.teachers, cfg.kd_alpha

    def train(self, data: DeviceData, aug_name: str, steps: int, taught: bool = False):
        """train_one_epoch itself (the trainer's hot loop, its periodic syncs included), stopped after `steps`;
        `taught`: with the teachers, their targets computed every step as under augmentation."""
        self.step.model.train()
        recipe = Config(augment=aug_name, batch_size=self.bench.batch_size, seed=0)
        result = train_one_epoch(self.taught if taught else self.step, data, next(self.epochs), self.bench.rt, recipe,
                                 on_sync=lambda done, total, loss: done >= steps, sync_every=min(25, steps))
        return result["images"], result["images"] // self.bench.batch_size

    def fixed_batch(self, x, y, steps: int):
        """Training steps on one ready batch: the model's share of a step, with no loading or augmentation."""
        self.step.model.train()
        for _ in range(steps):
            self.step(x, y, self.bench.rt)
        return steps * len(y), steps

    def loading(self, data: DeviceData, aug_name: str, steps: int):
        """Index slice + make_batch alone, as train_one_epoch does them: the pipeline's own cost."""
        rt, epoch = self.bench.rt, next(self.epochs)
        gen = torch.Generator(device=rt.device).manual_seed(epoch)
        perm = epoch_permutation(len(data), 0, epoch, rt.device)
        slices = list(batch_slices(len(data), self.bench.batch_size, drop_last=True))[:steps]
        for sl in slices:
            idx = perm[sl]
            make_batch(data.images[idx], AUGMENT_PRESETS[aug_name], gen, rt.mean, rt.std, rt.memory_format)
            data.labels[idx]
        return len(slices) * self.bench.batch_size, len(slices)

    def eval(self, data: DeviceData):
        """The trainer's evaluate: predict_logits in large batches under inference_mode, loss and accuracy."""
        evaluate(self.step.model, data, self.bench.rt, self.bench.eval_batch_size)
        return len(data), -(-len(data) // self.bench.eval_batch_size)


def flops_per_image(model) -> dict:
    """Counted, not estimated: forward alone and forward + backward (what a training step computes)."""
    model = copy.deepcopy(model).float().to("cpu", memory_format=torch.contiguous_format)
    x, y = torch.randn(8, *INPUT_SHAPE), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    forward = counter.get_total_flops() / len(x)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.train()(x), y).backward()
    return {"forward": forward, "train": counter.get_total_flops() / len(x)}


def works(bench: Bench, original: OriginalTrainer, ours: Ours, train: DeviceData, test: DeviceData) -> dict:
    """{name: Work}: original vs ours in training and evaluation, and the parts of our step."""
    steps, rt, aug = bench.steps, bench.rt, bench.augment
    fmt = "channels_last" if rt.memory_format == torch.channels_last else "NCHW"
    idx = epoch_permutation(len(train), 1, 0, bench.device)[: bench.batch_size]
    x, y = make_batch(train.images[idx], None, None, rt.mean, rt.std, rt.memory_format), train.labels[idx]
    return {
        "train_original": original.train_work(
            f"train original: torchvision, PIL RandomRotation(10), {bench.workers} workers, fp32 NCHW", steps),
        "train_ours": Work(f"train ours: uint8 on {bench.device.type}, batched augment {aug}, amp {rt.amp.name}, {fmt}",
                           lambda: ours.train(train, aug, steps)),
        "eval_original": Work(f"eval original: DataLoader, batch {bench.batch_size}, fp32 NCHW, no_grad",
                              original.eval),
        "eval_ours": Work(f"eval ours: predict_logits, batch {bench.eval_batch_size}, amp {rt.amp.name}, {fmt}, "
                          "inference_mode", lambda: ours.eval(test)),
        "step_augment": Work(f"our step, augment {aug}", lambda: ours.train(train, aug, steps)),
        "step_no_augment": Work("our step, augment none", lambda: ours.train(train, "none", steps)),
        "step_fixed_batch": Work("our step, one ready batch (no loading, no augment)",
                                 lambda: ours.fixed_batch(x, y, steps)),
        "load_augment": Work(f"load + augment {aug} alone", lambda: ours.loading(train, aug, steps)),
        **{f"matmul_{name}": Work(f"{name} matmul {MATMUL_SIZE} x {MATMUL_SIZE} (the machine's rate; one product a "
                                  "batch)", functools.partial(matmuls, bench.device, dtype)) for name, dtype in
           matmul_dtypes(rt).items()},
        **({"step_teachers": Work(f"our step, augment {aug}, with {len(bench.teachers.teachers)} teacher(s)",
                                  lambda: ours.train(train, aug, steps, taught=True))} if bench.teachers else {}),
    }


def matmul_dtypes(rt: ComputeSettings) -> dict:
    """fp32, and the dtype that autocast trains in when it is another."""
    return {"fp32": torch.float32, **({rt.amp.name: rt.amp.dtype} if rt.amp.dtype else {})}


def matmuls(device: torch.device, dtype: torch.dtype, count: int = 10) -> tuple[int, int]:
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    for _ in range(count):
        a @ a
    return count, count


def measure(bench: Bench, splits: dict, flops: dict) -> dict:
    """{name: its row}, original and ours starting from the same initial weights; each work once per round,
    in turn, so that drift on a shared machine hits all of them."""
    torch.manual_seed(0)
    model = bench.build()
    original_model = copy.deepcopy(model).to(bench.device)  # the recipe's plain fp32 NCHW
    ours = Ours(model.to(bench.device, memory_format=bench.rt.memory_format), bench)
    train, test = (DeviceData.create(*splits[split], bench.device) for split in ("train", "test"))
    per_image = {"train": flops["train"], "step": flops["train"], "eval": flops["forward"], "load": None,
                 "matmul": 2 * MATMUL_SIZE**3}
    with tempfile.TemporaryDirectory(prefix="fmnist-tv-") as root:
        write_torchvision_raw(Path(root), splits)
        original = OriginalTrainer(original_model, Path(root), bench)
        todo = works(bench, original, ours, train, test)
        for work in todo.values():  # warm-up: starts the workers, runs every shape of work once
            work.run()
        for r in range(bench.repeats):
            print(f"  ... round {r + 1}/{bench.repeats}", file=sys.stderr, flush=True)
            for work in todo.values():
                work.time(bench.device)
        rows = {name: work.as_dict(per_image[name.split("_")[0]]) for name, work in todo.items()}  # by the name's stem
        del original, todo  # shuts the persistent workers down before their folder goes
    return rows


def machine(device: torch.device) -> dict:
    import torchvision

    return {"cpu": cpu_info()[0], "cores": available_cpus(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torchvision": torchvision.__version__, "python": platform.python_version()}


def benchmark(bench: Bench, folder: Path) -> dict:
    """The whole report as one JSON-ready dict: the facts, the settings, every measurement, the ratios."""
    load_before = os.getloadavg()[0]
    splits = {split: read_split(folder, split) for split in ("train", "test")}
    if bench.tiny:
        splits = {split: (x[: TINY[split]], y[: TINY[split]]) for split, (x, y) in splits.items()}
    model = bench.build()
    flops = flops_per_image(model)
    rows = measure(bench, splits, flops)
    rate = {name: row["images_per_s"] for name, row in rows.items()}
    step_ms = {name: row["step_ms"] for name, row in rows.items()}
    return {
        "train_speedup": rate["train_ours"] / rate["train_original"],
        "eval_speedup": rate["eval_ours"] / rate["eval_original"],
        "pipeline_pct": 100 * step_ms["load_augment"] / step_ms["step_augment"],
        "augment_cost_pct": 100 * (step_ms["step_augment"] - step_ms["step_no_augment"]) / step_ms["step_augment"],
        "loop_minus_model_pct": 100 * (step_ms["step_augment"] - step_ms["step_fixed_batch"]) / step_ms["step_augment"],
        "epoch_seconds": EPOCH_IMAGES / rate["train_ours"],
        "matmul_share_pct": {name.removeprefix("matmul_"): 100 * rows["train_ours"]["gflop_per_s"] / row["gflop_per_s"]
                             for name, row in rows.items() if name.startswith("matmul_")},
        "teachers_cost_pct": 100 * (step_ms["step_teachers"] - step_ms["step_augment"]) / step_ms["step_augment"]
        if "step_teachers" in step_ms else None,
        "device": str(bench.device), "torch": torch.__version__, "machine": machine(bench.device),
        "load_average": [load_before, os.getloadavg()[0]],
        "model": {"arch": bench.model_name, "parameters": count_parameters(model)[0], "flops_per_image": flops},
        "settings": {"amp": bench.rt.amp.name, "channels_last": bench.rt.memory_format == torch.channels_last,
                     "batch_size": bench.batch_size, "eval_batch_size": bench.eval_batch_size,
                     "workers": bench.workers, "steps": bench.steps, "repeats": bench.repeats,
                     "augment": bench.augment, "tiny": bench.tiny},
        "data": {split: len(labels) for split, (_, labels) in splits.items()},
        "measurements": rows,
    }


def print_table(r: dict) -> None:
    """The report from its JSON alone, so that a saved file prints the same table."""
    m, s, model = r["machine"], r["settings"], r["model"]
    flops = model["flops_per_image"]
    print(f"machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), gpu {m['gpu'] or 'none'}; "
          f"torch {r['torch']}, torchvision {m['torchvision']}, python {m['python']}; "
          f"load average {r['load_average'][0]:.2f} before, {r['load_average'][1]:.2f} after")
    print(f"model: {model['arch']}, {model['parameters'] / 1e6:.2f} M parameters, {flops['forward'] / 1e6:.1f} "
          f"MFLOP/image forward, {flops['train'] / 1e6:.1f} MFLOP/image training (forward + backward)")
    print(f"settings: device {r['device']} | amp {s['amp']} | channels_last {s['channels_last']} | batch "
          f"{s['batch_size']} | eval batch {s['eval_batch_size']} | {s['workers']} workers | {r['data']['train']} "
          f"train + {r['data']['test']} test images | median of {s['repeats']} repeats x {s['steps']} steps"
          + (" | TINY: a smoke run, not a measurement" if s["tiny"] else ""))
    print("\n| measurement | images/s | ms per batch | GFLOP/s |\n|---|---:|---:|---:|")
    for row in r["measurements"].values():
        gflops = "-" if row["gflop_per_s"] is None else f"{row['gflop_per_s']:.1f}"
        print(f"| {row['label']} | {row['images_per_s']:,.0f} | {row['step_ms']:.2f} | {gflops} |")
    print(f"\ntrain speed-up: {r['train_speedup']:.2f}x | eval speed-up: {r['eval_speedup']:.2f}x | "
          f"our epoch of {EPOCH_IMAGES:,} images: {r['epoch_seconds']:.1f} s")
    print(f"load + augment: {r['pipeline_pct']:.1f}% of a training step | augment on vs off: "
          f"{r['augment_cost_pct']:+.1f}% | full loop vs one ready batch: {r['loop_minus_model_pct']:+.1f}% "
          "(differences of noisy medians)")
    print("our training reaches " + " | ".join(f"{pct:.0f}% of the {name} matmul rate"
                                               for name, pct in r["matmul_share_pct"].items()))
    if r.get("teachers_cost_pct") is not None:
        print(f"the teachers add {r['teachers_cost_pct']:+.1f}% to a training step")


def main(argv=None) -> int:
    def body() -> int:
        args = parse_args(argv)
        folder = find_data_dir(args.data_dir, "train")  # before the settings change torch's threads
        report = benchmark(resolve_settings(args), folder)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print_table(report)
        return 0

    return config.run(body, debug="--debug" in (sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
