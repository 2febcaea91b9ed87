"""Run every plan, from the shipped base models or from random weights, and write one table of what it achieved.

From the repository root:

    python -m bench.results                       # all plans, full data (hours on a 2-core CPU)
    python -m bench.results --tiny                # a few seconds per plan, to check the script works
    python -m bench.results --resume              # after a stop: runs only the plans not finished yet

Runs, each as a separate `finetune_gpu.py` process, the plans of PLANS; then, for each network, the ensemble
of its models (`test_model.py --full` with several --model-path). Writes results.json, results.md and the raw
log of every run into --report-dir.
"""

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from fashion_ft.system import available_cpus, cpu_info

REPO = Path(__file__).resolve().parents[1]


class Plan(NamedTuple):
    network: str  # also the ensemble it joins
    start: str | None  # "shipped" (the network's shipped base model), another plan's name, or None: random weights
    flags: list  # finetune_gpu.py flags


PLANS = {
    "light": Plan("cnn3", "shipped", ["--preset", "light"]),
    "two-round": Plan("cnn3", "light", ["--preset", "light", "--lr", "0.0005"]),
    "deep": Plan("cnn3", "shipped", ["--preset", "deep"]),
    "conservative": Plan("cnn3", "shipped", ["--preset", "conservative"]),
    "head": Plan("cnn3", "shipped", ["--preset", "head"]),
    "resnet20": Plan("resnet20", None, ["--preset", "resnet20"]),
    "resnet20-seed7": Plan("resnet20", None, ["--preset", "resnet20", "--seed", "7"]),  # a second ensemble member
    "resnet20-tune": Plan("resnet20", "shipped", ["--preset", "resnet20-tune"]),
}
TINY = ["--limit-train", "1024", "--epochs", "1", "--val-size", "1000"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS))
    p.add_argument("--model-path", default="model/mnist_cnn3.pt", help="the cnn3 base model")
    p.add_argument("--resnet-model-path", default="model/resnet20.pt", help="the ResNet-20 base model")
    p.add_argument("--work-dir", default="result/results", help="checkpoints and TensorBoard runs")
    p.add_argument("--report-dir", default="bench/results", help="results.json, results.md, logs")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tiny", action="store_true", help="1 epoch on 1,024 images per plan (a smoke test)")
    p.add_argument("--resume", action="store_true",
                   help="keep the plans an earlier run into --report-dir finished with the same command")
    return p


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_info()[0]}, {available_cpus()} cores, {gpu}, torch {torch.__version__}"


def command_text(cmd: list) -> str:
    """How a row records its command: without the interpreter, which differs between machines."""
    return " ".join(cmd[1:])


def plan_command(name: str, args, rows: dict, out: Path) -> list:
    """The finetune_gpu.py command of a plan, from a shipped model, another plan's output or random weights."""
    plan = PLANS[name]
    if plan.start == "shipped":
        base = REPO / {"cnn3": args.model_path, "resnet20": args.resnet_model_path}[plan.network]
    else:
        base = rows[plan.start]["checkpoint"] if plan.start else None
    return [sys.executable, "finetune_gpu.py", *(["--model-path", str(base)] if base else []), *plan.flags,
            "--output", str(out), "--logdir", str(out.parent.parent / "tb"), "--run-name", name, "--overwrite",
            "--device", args.device, *(["--data-dir", args.data_dir] if args.data_dir else []),
            *(TINY if args.tiny else [])]


def run_plan(name: str, cmd: list, out: Path, logs: Path) -> dict:
    start = time.perf_counter()
    with open(logs / f"{name}.log", "w") as fh:  # streamed, so that a stopped run keeps its log
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    row = {"plan": name, "command": command_text(cmd), "exit_code": code,
           "wall_s": round(time.perf_counter() - start, 1)}
    if code == 0:
        m = json.loads((out.parent / "metrics.json").read_text())
        row.update(test_acc=m["test_acc"], val_acc=m["best_val_acc"], best_epoch=m["best_epoch"],
                   epochs_run=m["epochs_run"], checkpoint=str(out))
    return row


def finished_rows(report: Path) -> dict:
    """{plan: row} of an earlier run into this report whose plan succeeded and whose model is still there."""
    path = report / "results.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    return {r["plan"]: r for r in rows
            if r["exit_code"] == 0 and r.get("checkpoint") and Path(r["checkpoint"]).is_file()}


def run_ensemble(network: str, paths: list, args, logs: Path) -> dict:
    cmd = [sys.executable, "test_model.py", "--full", "--json", "--device", args.device, "--model-path", *paths]
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (logs / f"ensemble_{network}.log").write_text("$ " + " ".join(cmd) + "\n" + result.stdout + result.stderr)
    row = {"plan": f"{network} ensemble of {len(paths)}", "command": command_text(cmd),
           "exit_code": result.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    if result.returncode == 0:
        check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "ensemble")
        row["test_acc"] = check["data"]["accuracy"]
    return row


def markdown(rows: list, header: str) -> str:
    def percent(row: dict, key: str) -> str:
        return f"{100 * row[key]:.2f}%" if key in row else "-"

    lines = [header, "", "| plan | test acc | val acc | best epoch | epochs run | wall time |", "|---|---|---|---|---|---|"]
    for r in rows:
        status = "" if r["exit_code"] == 0 else f" (failed, exit {r['exit_code']})"
        lines.append(f"| {r['plan']}{status} | {percent(r, 'test_acc')} | {percent(r, 'val_acc')} "
                     f"| {r.get('best_epoch', '-')} | {r.get('epochs_run', '-')} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def write_report(rows: list, report: Path, tiny: bool) -> str:
    header = f"Measured {datetime.date.today()} on {machine()}"
    header += " (--tiny: 1 epoch on 1,024 images, not a result)" if tiny else ""
    table = markdown(rows, header)
    (report / "results.md").write_text(table)
    (report / "results.json").write_text(json.dumps({"machine": header, "rows": rows}, indent=2) + "\n")
    return table


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    work, report = REPO / args.work_dir, REPO / args.report_dir
    logs = report / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name in args.plans:
        start = PLANS[name].start
        if start in PLANS and start not in args.plans:
            raise SystemExit(f"--plans: {name} starts from the {start} plan's output; add {start}")
    earlier, rows = finished_rows(report) if args.resume else {}, {}  # rows: {plan: row}
    for name in sorted(args.plans, key=list(PLANS).index):  # light before two-round
        start = PLANS[name].start
        if start in PLANS and not rows[start].get("checkpoint"):
            rows[name] = {"plan": name, "exit_code": -1, "wall_s": 0.0, "command": f"skipped: {start} failed"}
            continue
        out = work / name / "best.pt"
        cmd, kept = plan_command(name, args, rows, out), earlier.get(name)
        rows[name] = kept if kept and kept["command"] == command_text(cmd) else run_plan(name, cmd, out, logs)
        kept_note = "  (kept from the earlier run)" if rows[name] is kept else ""
        print(markdown([rows[name]], "").splitlines()[-1] + kept_note, flush=True)
        write_report(list(rows.values()), report, args.tiny)  # after every plan: a stopped run keeps what it measured
    members = {}  # network -> the models its plans made
    for name, row in rows.items():
        if row.get("checkpoint"):
            members.setdefault(PLANS[name].network, []).append(row["checkpoint"])
    for network, paths in members.items():
        if len(paths) > 1:  # members of one network: a weaker network's vote would only dilute a stronger one's
            rows[f"{network} ensemble"] = run_ensemble(network, paths, args, logs)
    print(write_report(list(rows.values()), report, args.tiny))
    return 0 if all(r["exit_code"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
