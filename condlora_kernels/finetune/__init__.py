"""`condlora finetune`: PEFT LoRA and CondLoRA side by side on a real model and real data (see cli.py).

The pieces are public for tools/lr_sweep.py and for scripts: load_csv -> prepare_data (split and tokenise
once) -> finetune(method, model_path, data, TrainSettings(...)) -> MethodResult.
"""

from condlora_kernels.finetune.data import (InputError, PreparedData, TextDataset, default_data_path, load_csv,
                                            prepare_data, split_indices)
from condlora_kernels.finetune.train import (METHODS, RECOMMENDED_LR, MethodResult, TrainSettings, finetune,
                                             load_model, load_tokenizer, recommended_lr)

__all__ = ["InputError", "METHODS", "MethodResult", "PreparedData", "RECOMMENDED_LR", "TextDataset",
           "TrainSettings", "default_data_path", "finetune", "load_csv", "load_model", "load_tokenizer",
           "prepare_data", "recommended_lr", "split_indices"]
