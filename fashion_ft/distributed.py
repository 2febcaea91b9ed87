"""torchrun support: rank and world size from the environment, the process group, collectives, and the
failures of other ranks.

Without a torchrun environment everything here is a no-op for a single process. Under torchrun, even
with one process, the run takes the distributed path (process group, DDP, barriers), so that a
one-GPU check exercises the same code as a multi-GPU run.
"""

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from .errors import chain

# A rank that dies leaves the others waiting in a collective; this bounds the wait.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=5)

# What gloo and NCCL put in a plain RuntimeError when another rank has gone away.
PEER_FAILURE_MARKERS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "third_party/gloo",
    "processgroupgloo", "processgroupnccl", "ncclremoteerror", "ncclsystemerror", "socket timeout",
    "connectfullmesh",
)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # started by torchrun (or another launcher setting RANK and WORLD_SIZE)

    @property
    def enabled(self) -> bool:
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(env=None) -> DistInfo:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (WORLD_SIZE=1 included)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return DistInfo()
    world = int(env["WORLD_SIZE"])
    return DistInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world)),
                    launched=True)


def init(info: DistInfo, device: torch.device) -> None:
    """The process group; on CUDA each rank first makes its own GPU the current device, so that
    NCCL and anything that uses the current device (barrier, caches) do not all land on GPU 0."""
    if not info.enabled or tdist.is_initialized():
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT, device_id=device if cuda else None)


def backend() -> str | None:
    """The process group's backend (nccl, gloo), None without torchrun."""
    return tdist.get_backend() if tdist.is_initialized() else None


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


@contextmanager
def main_process_first(info: DistInfo):
    """Local rank 0 runs the block first (a download into a shared folder); the other ranks of the
    machine wait at a barrier and then run it (reading what is there). Needs the process group.

    Rank 0 reaches its barrier even when the block fails, so the others go on and fail on their own
    instead of waiting for the timeout."""
    first = info.local_rank == 0
    if info.enabled and not first:
        barrier()
    try:
        yield
    finally:
        if info.enabled and first:
            barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def per_rank(value: torch.Tensor) -> list[float]:
    """Every rank's value of a scalar tensor, on every rank: one all-reduce of a vector that holds
    each rank's value in its own slot (a sum with zeros keeps NaN and Inf as they are)."""
    if not tdist.is_initialized():
        return [float(value)]
    slots = torch.zeros(tdist.get_world_size(), device=value.device, dtype=torch.float32)
    slots[tdist.get_rank()] = value.float()
    tdist.all_reduce(slots, op=tdist.ReduceOp.SUM)
    return slots.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any one (so all ranks stop at the same step)."""
    if not tdist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite the tensors on every rank with rank `src`'s, each through a contiguous copy (collectives
    refuse channels_last tensors; for the usual 1-d statistics the copy is the tensor itself)."""
    if tdist.is_initialized():
        for t in tensors:
            flat = t.contiguous()
            tdist.broadcast(flat, src=src)
            t.copy_(flat)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """BatchNorm statistics (and the averaged ones of an EMA copy) drift apart across ranks, since each
    rank normalises its own batches; the weights do not (DDP averages the gradients). Call this before
    evaluating, so that every rank evaluates what rank 0 saves."""
    broadcast_tensors(list(module.buffers()), src)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is torch.distributed reporting that another rank went away:
    DistError and its subclasses, or the plain RuntimeError that gloo raises ("Connection closed by peer")."""
    return any(isinstance(e, tdist.DistError) or (isinstance(e, RuntimeError) and any(
        m in str(e).lower() for m in PEER_FAILURE_MARKERS)) for e in chain(exc))
