"""CondLoRA on several GPUs (issue #14): DDP and FSDP2 against one process, and training throughput.

Run under torchrun; every process takes the GPU of its LOCAL_RANK (or, with --device cpu, the CPU and gloo).

--check: trains a transformer built from a config (the benchmarks' RoBERTa-base, or with --model llama their
Llama-style stack LLAMA_2L: hidden 4096, FFN 11008, 2 layers, every projection adapted) with CondLoRA for --steps
SGD steps on the same global batches, three ways:

    ddp              DistributedDataParallel, each rank one share of every global batch
    ddp-checkpoint   the same with the model's gradient checkpointing (use_reentrant=False)
    fsdp2            shard_condlora_model: fully_shard each block, then the root (which holds the generators)

and compares each with one process training on the whole global batches (run by rank 0 first, on its device,
while the others wait): the per-step loss (the mean over the ranks) and every trainable parameter at the end
(the generators and the classifier head; FSDP2's shards gathered), and checks that the ranks hold the same
parameters. theta_b is drawn at random (it starts at zero, which would zero theta_a's first gradients), dropout is
off. SGD, because its update is linear in the gradient: AdamW divides by the gradient's size, so an element with a
near-zero gradient can take a full step either way on a rounding difference. The tolerance is relative: the
largest loss difference against TOLERANCE x the largest loss, the largest parameter difference against
TOLERANCE x the largest parameter update of the single process (float64: 1e-9, float32: 1e-3; TF32 is off).
A sharding or reduction bug moves the generators by a sizeable fraction of their update (one block's
contribution missing: ~1/layers of it). Exit code 1 if a strategy is outside the tolerance.

--throughput: training examples/s on the current world size for PEFT LoRA and CondLoRA (backend "auto", the
fastest that runs here), DDP (or --strategy fsdp2), each GPU taking the benchmark case's batch (RoBERTa-base
16 x 512, the Llama stack 8 x 1024; so the global batch grows with the GPUs), bf16 autocast on CUDA (FSDP2: its
bf16 MixedPrecisionPolicy), AdamW; with the peak memory of every GPU. Run it once per world size.

Results: printed, and as JSON with --out (written by rank 0).

GPU recipe (2 GPUs; the 1-GPU runs give the throughput baseline):

    torchrun --standalone --nproc_per_node 2 tools/multigpu.py --check --out mg_check_roberta.json
    torchrun --standalone --nproc_per_node 2 tools/multigpu.py --check --model llama --out mg_check_llama.json
    torchrun --standalone --nproc_per_node 1 tools/multigpu.py --throughput --out mg_tp_roberta_1.json
    torchrun --standalone --nproc_per_node 2 tools/multigpu.py --throughput --out mg_tp_roberta_2.json
    torchrun --standalone --nproc_per_node 1 tools/multigpu.py --throughput --model llama --out mg_tp_llama_1.json
    torchrun --standalone --nproc_per_node 2 tools/multigpu.py --throughput --model llama --out mg_tp_llama_2.json
    torchrun --standalone --nproc_per_node 2 tools/multigpu.py --throughput --strategy fsdp2 --out mg_tp_fsdp2.json

CPU (what tests/test_torchrun.py runs; tiny configs of the same families, float64):

    torchrun --standalone --nproc_per_node 2 tools/multigpu.py --device cpu --tiny --check --throughput --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from condlora_kernels import condlora_generators, shard_condlora_model
from condlora_kernels.bench.model import attach, build_model, make_batch
from condlora_kernels.bench.report import environment
from condlora_kernels.bench.shapes import LLAMA_2L, LLAMA_TINY, ROBERTA_BASE, ROBERTA_TINY
from condlora_kernels.finetune.parallel import init_process_group

CASES = {("roberta", False): ROBERTA_BASE, ("roberta", True): ROBERTA_TINY,
         ("llama", False): LLAMA_2L, ("llama", True): LLAMA_TINY}
BLOCK_CLASSES = {"roberta": ["RobertaLayer"], "llama": ["LlamaDecoderLayer"]}
STRATEGIES = ("ddp", "ddp-checkpoint", "fsdp2")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}
# transformers computes the causal-LM loss in float32 whatever the model's dtype (its loss upcasts the logits with
# .float()): the losses of a float64 run are compared at float32's rounding (measured: 9e-8 relative)
LOSS_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
THROUGHPUT_PROVIDERS = ("peft_lora", "condlora[auto]")


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @functools.cached_property
    def mesh(self):
        """FSDP2's mesh on this run's device, made once. fully_shard's default mesh is the accelerator's: with
        --device cpu on a host with a GPU it would move the model to CUDA, and under torchrun with more ranks than
        GPUs each rank would select cuda:LOCAL_RANK, which does not exist (an "invalid device ordinal" on a one-GPU
        host)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.size,))


def start(device_type: str) -> World:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); one process without torchrun."""
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("multigpu.py: torch sees no CUDA device here (use --device cpu)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 is float32
    else:
        device = torch.device("cpu")
    backend, timeout = ("nccl" if device.type == "cuda" else "gloo"), datetime.timedelta(minutes=20)
    if "RANK" in os.environ:
        init_process_group(backend, timeout=timeout)
    else:  # plain `python tools/multigpu.py`: a group of one (FSDP2 needs a group)
        store = os.path.join(tempfile.mkdtemp(prefix="multigpu-"), "store")
        init_process_group(backend, init_method="file://" + store, rank=0, world_size=1, timeout=timeout)
    return World(rank, size, device)


def all_reduce(tensor: torch.Tensor, world: World, op=dist.ReduceOp.SUM) -> torch.Tensor:
    tensor = tensor.to(world.device)  # NCCL reduces device tensors
    dist.all_reduce(tensor, op=op)
    return tensor.cpu()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------------


def check_case(family: str, tiny: bool):
    """The family's case with dropout off (the ranks and the single process must draw no masks)."""
    case = CASES[(family, tiny)]
    if family == "roberta":
        case = dataclasses.replace(case, config=case.config + (("hidden_dropout_prob", 0.0),
                                                               ("attention_probs_dropout_prob", 0.0)))
    return case


def check_model(case, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The same model on every rank and in the single process: weights from seed 0, CondLoRA, random theta_b."""
    model = attach("condlora[auto]", build_model(case, device).to(dtype), case, dropout=0.0)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for generator in condlora_generators(model).values():
            scale = generator.theta_a.abs().mean()  # as large as theta_a: a sizeable low-rank update
            generator.theta_b.copy_(torch.randn(generator.theta_b.shape, generator=g) * scale)
    return model.train()


def check_batches(case, model, args) -> dict:
    """args.steps global batches of args.global_batch sequences of args.seq tokens (and labels), on the CPU."""
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(2, model.config.vocab_size, (args.steps, args.global_batch, args.seq), generator=g)
    if case.family == "roberta":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (args.steps, args.global_batch), generator=g)}
    return {"input_ids": ids, "labels": ids}  # causal LM: the model shifts the labels


def wrap(model, strategy: str, world: World, family: str):
    if strategy == "ddp-checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if strategy == "fsdp2":
        return shard_condlora_model(model, block_classes=BLOCK_CLASSES[family], mesh=world.mesh)
    if strategy in ("ddp", "ddp-checkpoint"):
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    return model


def trainable_state(model) -> dict:
    """Every trainable parameter, whole (FSDP2: gathered from the shards, a collective), float64 on the CPU."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = param.detach()
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            state[name] = tensor.to(device="cpu", dtype=torch.float64, copy=True)
    return state


def train_check(model, wrapped, batches: dict, rows: slice, steps: int, lr: float, device) -> list:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = wrapped(**{k: v[step, rows].to(device) for k, v in batches.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().double())
    return torch.stack(losses).cpu().tolist()


def single_process_reference(case, args, world: World, dtype) -> dict:
    model = check_model(case, world.device, dtype)
    initial = trainable_state(model)
    batches = check_batches(case, model, args)
    losses = train_check(model, model, batches, slice(None), args.steps, args.lr, world.device)
    final = trainable_state(model)
    update = max((final[n] - initial[n]).abs().max().item() for n in final)
    del model
    return {"losses": losses, "params": final, "largest_update": update}


def run_strategy(strategy: str, case, family: str, args, world: World, dtype, reference) -> dict:
    model = check_model(case, world.device, dtype)
    batches = check_batches(case, model, args)
    share = args.global_batch // world.size
    wrapped = wrap(model, strategy, world, family)
    rows = slice(world.rank * share, (world.rank + 1) * share)
    losses = all_reduce(torch.tensor(train_check(model, wrapped, batches, rows, args.steps, args.lr, world.device),
                                     dtype=torch.float64), world) / world.size
    params = trainable_state(model)
    flat = torch.cat([params[n].flatten() for n in sorted(params)])
    rank0 = flat.clone().to(world.device)
    dist.broadcast(rank0, src=0)
    spread = all_reduce((flat - rank0.cpu()).abs().max().reshape(1), world, dist.ReduceOp.MAX).item()
    del model, wrapped
    if not world.main:
        return {}
    tolerance = TOLERANCE[dtype]
    loss_diff = max(abs(a - b) for a, b in zip(losses.tolist(), reference["losses"]))
    param_diff = max((params[n] - reference["params"][n]).abs().max().item() for n in reference["params"])
    loss_allowed = LOSS_TOLERANCE[dtype] * max(abs(v) for v in reference["losses"])
    param_allowed = tolerance * reference["largest_update"]
    finite = bool(torch.isfinite(losses).all() and torch.isfinite(torch.tensor(reference["losses"])).all()
                  and all(torch.isfinite(t).all() for t in params.values()))
    ok = finite and loss_diff <= loss_allowed and param_diff <= param_allowed and spread <= param_allowed
    return {"strategy": strategy, "ok": ok, "finite": finite, "max_loss_difference": loss_diff,
            "loss_allowed": loss_allowed,
            "max_parameter_difference": param_diff, "parameter_allowed": param_allowed,
            "rank_spread": spread, "largest_update": reference["largest_update"], "losses": losses.tolist(),
            "reference_losses": reference["losses"]}


def check(family: str, args, world: World) -> dict:
    dtype = DTYPES[args.dtype or ("fp64" if world.device.type == "cpu" else "fp32")]
    case = check_case(family, args.tiny)
    if args.global_batch % world.size:
        sys.exit(f"multigpu.py: --global-batch {args.global_batch} is not divisible by the {world.size} processes")
    reference = single_process_reference(case, args, world, dtype) if world.main else None
    dist.barrier()
    results = [run_strategy(s, case, family, args, world, dtype, reference) for s in args.strategies]
    if world.main:
        print(f"check: {case.name}, {args.steps} SGD steps (lr {args.lr:g}), global batch {args.global_batch} x "
              f"{args.seq} tokens, {world.size} process(es) against 1, {args.dtype or dtype}, tolerance "
              f"{TOLERANCE[dtype]:g} (relative)")
        for r in results:
            verdict = "ok" if r["ok"] else "FAILED" if r["finite"] else "NON-FINITE (lower --lr)"
            print(f"  {r['strategy']:15s} {verdict:6s} loss diff {r['max_loss_difference']:.2e} "
                  f"(allowed {r['loss_allowed']:.1e})  param diff {r['max_parameter_difference']:.2e} "
                  f"(allowed {r['parameter_allowed']:.1e}, largest update {r['largest_update']:.2e})  "
                  f"rank spread {r['rank_spread']:.1e}")
    return {"case": case.as_dict(), "dtype": str(dtype), "steps": args.steps, "lr": args.lr,
            "global_batch": args.global_batch, "seq": args.seq, "tolerance": TOLERANCE[dtype], "strategies": results}


# --------------------------------------------------------------------------------------------------
# --throughput
# --------------------------------------------------------------------------------------------------


def shard_blocks_then_root(model, family: str, world: World, **fsdp_kwargs):
    """FSDP2 with the same units for every provider: shard_condlora_model for a CondLoRA model (its checks), the same
    calls by hand for the others (PEFT LoRA has no CondLoRA layer, which shard_condlora_model refuses)."""
    from torch.distributed.fsdp import fully_shard

    if condlora_generators(model):
        return shard_condlora_model(model, block_classes=BLOCK_CLASSES[family], mesh=world.mesh, **fsdp_kwargs)
    for block in [m for m in model.modules() if type(m).__name__ in BLOCK_CLASSES[family]]:
        fully_shard(block, mesh=world.mesh, **fsdp_kwargs)
    return fully_shard(model, mesh=world.mesh, **fsdp_kwargs)


def throughput_point(provider: str, family: str, args, world: World) -> dict:
    case = CASES[(family, args.tiny)]
    bf16 = world.device.type == "cuda" and args.precision == "bf16"
    model = attach(provider, build_model(case, world.device), case, dropout=0.0).train()
    wrapped, autocast = model, bf16  # one process: the plain model, as a user runs it on one GPU
    if world.size > 1 and args.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        wrapped = shard_blocks_then_root(model, family, world, **({"mp_policy": policy} if policy else {}))
        autocast = False
    elif world.size > 1:
        wrapped = wrap(model, "ddp", world, family)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(case, model, world.device)

    def step():
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = wrapped(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    for _ in range(args.warmup):
        step()
    synchronize(world.device)
    dist.barrier()
    start_time = time.perf_counter()
    for _ in range(args.timed_steps):
        step()
    synchronize(world.device)
    elapsed = all_reduce(torch.tensor([time.perf_counter() - start_time]), world, dist.ReduceOp.MAX).item()
    peaks = torch.zeros(world.size, dtype=torch.float64)
    peaks[world.rank] = torch.cuda.max_memory_allocated(world.device) if world.device.type == "cuda" else -1
    peaks = all_reduce(peaks, world)
    del model, wrapped, optimizer
    if world.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"provider": provider, "strategy": args.strategy if world.size > 1 else "single", "world_size": world.size,
            "batch_per_process": case.batch, "seq": case.seq, "steps": args.timed_steps, "seconds": elapsed,
            "examples_per_s": world.size * case.batch * args.timed_steps / elapsed,
            "peak_memory_bytes_per_process": [None if p < 0 else int(p) for p in peaks.tolist()]}


def throughput(family: str, args, world: World) -> dict:
    case = CASES[(family, args.tiny)]
    rows = [throughput_point(provider, family, args, world) for provider in THROUGHPUT_PROVIDERS]
    if world.main:
        precision = args.precision if world.device.type == "cuda" else "fp32"
        print(f"throughput: {case.name}, {world.size} process(es), {rows[0]['strategy']}, {precision}, "
              f"batch {case.batch} x {case.seq} per process, {args.timed_steps} timed steps")
        for r in rows:
            memory = ", ".join(f"{p / 2**30:.2f}" for p in r["peak_memory_bytes_per_process"] if p is not None)
            print(f"  {r['provider']:15s} {r['examples_per_s']:9.1f} examples/s" +
                  (f"  peak memory per GPU (GiB): {memory}" if memory else ""))
    return {"case": case.as_dict(), "precision": args.precision if world.device.type == "cuda" else "fp32",
            "rows": rows}


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="DDP and FSDP2 against one process")
    parser.add_argument("--throughput", action="store_true", help="examples/s and peak memory per GPU")
    parser.add_argument("--model", nargs="+", choices=("roberta", "llama"), default=["roberta"],
                        help="roberta (RoBERTa-base), llama (LLAMA_2L), or both, one after the other")
    parser.add_argument("--tiny", action="store_true", help="the tiny configs of the benchmarks (CPU tests)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=5, help="--check: SGD steps (default 5)")
    parser.add_argument("--lr", type=float, default=0.05, help="--check: SGD learning rate (default 0.05)")
    parser.add_argument("--global-batch", type=int, default=4, help="--check: sequences per step (default 4)")
    parser.add_argument("--seq", type=int, help="--check: tokens per sequence (default 128; --tiny 16)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="--check: default fp32 on CUDA, fp64 on the CPU")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp", help="--throughput (default ddp)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="--throughput on CUDA")
    parser.add_argument("--warmup", type=int, default=3, help="--throughput: untimed steps (default 3)")
    parser.add_argument("--timed-steps", type=int, default=10, help="--throughput: timed steps (default 10)")
    parser.add_argument("--out", metavar="JSON", help="write the results here (rank 0)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.check or args.throughput):
        build_parser().error("nothing to do: give --check, --throughput or both")
    args.seq = args.seq or (16 if args.tiny else 128)
    world = start(args.device)
    record = {"command": ["tools/multigpu.py", *(sys.argv[1:] if argv is None else argv)],
              "world_size": world.size, "environment": environment(world.device)}
    for family in args.model:
        if args.check:
            record.setdefault("check", {})[family] = check(family, args, world)
        if args.throughput:
            record.setdefault("throughput", {})[family] = throughput(family, args, world)
    ok = all(r["ok"] for c in record.get("check", {}).values() for r in c["strategies"]) if world.main else True
    verdict = all_reduce(torch.tensor([float(ok)]), world, dist.ReduceOp.MIN).item() == 1.0
    if world.main and args.out:
        with open(args.out, "w") as f:
            json.dump({**record, "ok": verdict}, f, indent=2)
        print(f"wrote {args.out}")
    dist.barrier()  # no rank tears the group down while a peer still uses it (gloo aborted one at exit, rarely)
    dist.destroy_process_group()
    return 0 if verdict else 1


if __name__ == "__main__":
    code = main()
    # Ended without the interpreter's teardown: after fully_shard, destroy_process_group leaves gloo's threads
    # running (torch holds the group outside Python), and one that drops a collective's tensor while Python shuts
    # down aborts the process ("terminate called without an active exception"; 1 launch in 30 here,
    # benchmarks/NOTES.md, sixteenth session). Everything is written and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
