"""Training configurations run in a group of CPU processes (gloo), as torchrun would start them: one spawn for all
configurations of a test file (tests/test_distributed.py, tests/test_fsdp.py)."""

import datetime
import json
import os
import warnings

import torch

from condlora_kernels.finetune.parallel import init_process_group  # safe to destroy (see there)


def _worker(rank, run_config, names, world_size, output_dir):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    # the environment torchrun would set (accelerate and the Trainer read it); the group meets in a file, no port
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    init_process_group("gloo", init_method="file://" + os.path.join(output_dir, "store"), rank=rank,
                       world_size=world_size, timeout=datetime.timedelta(seconds=120))
    results = {name: run_config(name, rank, output_dir) for name in names}
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()
    # without the interpreter's teardown: after fully_shard (tests/test_fsdp.py) gloo's threads outlive the group,
    # and one that drops a tensor while Python shuts down can abort the process (docs/design.md §8.7)
    os._exit(0)


def run_in_processes(run_config, names, world_size: int, output_dir: str) -> dict:
    """{name: (rank 0's result, rank 1's, ...)}: run_config(name, rank, output_dir) (a module-level function,
    returning something JSON can hold) for every name, in `world_size` processes spawned once."""
    torch.multiprocessing.spawn(_worker, args=(run_config, list(names), world_size, output_dir), nprocs=world_size,
                                join=True)
    by_rank = []
    for rank in range(world_size):
        with open(os.path.join(output_dir, f"rank{rank}.json")) as f:
            by_rank.append(json.load(f))
    return {name: tuple(r[name] for r in by_rank) for name in names}
