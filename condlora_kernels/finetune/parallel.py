"""`condlora finetune` under torchrun: data-parallel training (DDP) on one process's global batches.

    torchrun --standalone --nproc_per_node 2 -m condlora_kernels finetune [options]

Every process reads the data and loads the model as one process would, and takes the GPU of its LOCAL_RANK (with
--device cpu, the CPU and the gloo backend). Each optimizer step trains on the same global batch of --batch-size
sentences as one process does, so the steps, the schedule and the learning rates are those of a single process:
process r takes rows r, r + N, r + 2N, ... of the global batch, and DistributedDataParallel averages the
gradients. (torch's DistributedSampler would instead give each process its own batches of --batch-size rows and
repeat rows to even out the last ones.) Each process's loss is its rows' summed cross-entropy times
N / (rows of the global batch), so that DDP's average is the mean gradient of the global batch also when the rows
do not divide evenly; a process left without a row in the last batch runs one row with weight zero, because DDP
needs every process in every step. The held-out split is scored the same way (rows r, r + N, ... of it, counts
summed over the processes). Process 0 prints, shows the progress bars and writes the results.

What still differs from one process: each process draws the dropout masks of its own rows, and floating-point
sums run in another order; with dropout off the accuracy is the same (tests/test_torchrun.py).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from condlora_kernels.finetune.data import InputError


@dataclass(frozen=True)
class Processes:
    """This process's place among those torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = Processes()


def from_environment() -> Processes:
    """The variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
    return Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))


def process_device(processes: Processes, device: torch.device) -> torch.device:
    """Under torchrun with CUDA, the GPU of this process's LOCAL_RANK."""
    if not processes.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise InputError(f"--device {device} under torchrun: each process takes the GPU of its LOCAL_RANK; pass "
                         "--device cuda (or auto)")
    if processes.local_rank >= torch.cuda.device_count():
        raise InputError(f"process {processes.rank} has LOCAL_RANK {processes.local_rank} but torch sees "
                         f"{torch.cuda.device_count()} GPU(s): start at most that many processes per machine")
    return torch.device("cuda", processes.local_rank)


def start(processes: Processes, device: torch.device) -> None:
    """Join torchrun's process group: NCCL on CUDA, gloo on the CPU."""
    if processes.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))


def init_process_group(backend: str, **kwargs) -> None:
    """dist.init_process_group, made safe to destroy. torch.distributed.nn binds the default group (group.WORLD) as
    its functions' default argument when it is first imported; imported after the group exists (DDP's constructor
    imports it, through torch._dynamo), it keeps that group alive for the life of the process, and
    destroy_process_group cannot free it. gloo's worker threads then outlive the interpreter, and one that drops a
    collective's tensor while Python shuts down aborts the process ("terminate called without an active
    exception", seen under torchrun). Imported first, the defaults are None and the group is freed."""
    import torch.distributed.nn  # noqa: F401  (before the group exists: see above)

    dist.init_process_group(backend, **kwargs)


def stop(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, processes: Processes, device: torch.device) -> torch.nn.Module:
    """The module to train: DistributedDataParallel around `model` when there are several processes."""
    if not processes.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def my_rows(rows: list, processes: Processes) -> tuple:
    """(this process's rows of a global batch, their weight): rows r, r + N, ...; one row of weight 0 when none
    is left for this process."""
    mine = rows[processes.rank::processes.size]
    return (mine, 1.0) if mine else (rows[:1], 0.0)


def sum_over(values: torch.Tensor, processes: Processes, device: torch.device) -> torch.Tensor:
    """`values` summed over the processes (itself with one process), on the CPU."""
    if not processes.distributed:
        return values
    values = values.to(device)  # NCCL reduces device tensors
    dist.all_reduce(values)
    return values.cpu()


def longest(seconds: float, processes: Processes, device: torch.device) -> float:
    """The longest of the processes' times."""
    if not processes.distributed:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()
