"""torchrun support: rank and world size from the environment, DDP wrapping, reductions.

With no torchrun environment everything here is a no-op for a single process.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

# A rank that dies leaves the others waiting in a collective; this bounds the wait.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    return DistInfo(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
    )


def init(info: DistInfo, device: torch.device) -> None:
    if not info.enabled or tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    tdist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT, **kwargs)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


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
