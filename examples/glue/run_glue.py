#!/usr/bin/env python
"""Fine-tune a sequence classifier on GLUE or on local CSV/JSON files, optionally with Cuttlefish low-rank training.

Run from the repository root. SST-2 with a Hub model, vanilla, then with Cuttlefish (measuring every 100 steps):

    python examples/glue/run_glue.py --model_name_or_path google-bert/bert-base-uncased --task_name sst2 \
        --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5 \
        --num_train_epochs 3 --output_dir outputs/sst2
    python examples/glue/run_glue.py --model_name_or_path google-bert/bert-base-uncased --task_name sst2 \
        --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5 \
        --num_train_epochs 3 --output_dir outputs/sst2-cuttlefish --cuttlefish --measure_every_steps 100

Offline, with any local model folder and CSV/JSON files (columns: one or two text columns and "label"):

    python examples/glue/run_glue.py --model_name_or_path path/to/model --train_file train.csv \
        --validation_file validation.csv --do_train --do_eval --output_dir outputs/local --cuttlefish

Every flag can also come from a JSON file: ``python examples/glue/run_glue.py args.json``. ``--help`` lists them;
the Cuttlefish flags are the fields of ``CuttlefishConfig``, read by ``HfArgumentParser`` (lists and dicts as JSON:
``--rank_pattern '{"output.dense": 64}'``). The output directory gets the model (reload it with
``import cuttlefish_hf`` and ``AutoModelForSequenceClassification.from_pretrained``), ``eval_results.json`` with the
Cuttlefish summary, ``stable_ranks.png`` and, with ``--report_to tensorboard``, TensorBoard logs.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

import cuttlefish_hf  # noqa: F401  (registers the loader of factorized checkpoints with the auto classes)
from cuttlefish_hf import CuttlefishConfig, CuttlefishTrainer
from cuttlefish_hf.plotting import plot_stable_ranks

logger = transformers.utils.logging.get_logger(__name__)

METRIC_PATH = str(Path(__file__).resolve().parent / "glue_metric")
GLUE_DATASET = "nyu-mll/glue"
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
DATA_EXTENSIONS = ("csv", "json")
REGRESSION_DTYPES = ("float32", "float64")  # a float label column makes a local dataset a regression


@dataclass
class ModelArguments:
    """Which model and tokenizer to fine-tune."""

    model_name_or_path: str = field(metadata={"help": "A Hub model id or a local folder (a factorized one too)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    task_name: str | None = field(default=None, metadata={"help": (
        f"A GLUE task, loaded from the Hub dataset {GLUE_DATASET}: one of {', '.join(TASK_TO_KEYS)}.")})
    train_file: str | None = field(default=None, metadata={"help": (
        "A local CSV or JSON file with one or two text columns ('sentence1'/'sentence2' when there are more) and "
        "a 'label' column (classes, or floats for regression). Use instead of --task_name.")})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same format."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated; batches are padded "
                                                               "to their longest input."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N validation rows."})

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"--task_name {self.task_name!r} is not a GLUE task; choose one of "
                                 f"{', '.join(TASK_TO_KEYS)}, or give local data with --train_file.")
            if self.train_file or self.validation_file:
                raise ValueError("Give either --task_name (GLUE from the Hub) or --train_file/--validation_file.")
        elif self.train_file is None:
            raise ValueError("Give --task_name (a GLUE task) or --train_file (local CSV/JSON data).")
        for flag in ("train_file", "validation_file"):
            path = getattr(self, flag)
            if path is None:
                continue
            if path.rsplit(".", 1)[-1] not in DATA_EXTENSIONS:
                raise ValueError(f"--{flag} {path}: expected a .csv or .json file.")
            if not os.path.isfile(path):
                raise ValueError(f"--{flag} {path}: no such file.")
        if self.validation_file and self.validation_file.rsplit(".", 1)[-1] != self.train_file.rsplit(".", 1)[-1]:
            raise ValueError("--validation_file must have the same format (extension) as --train_file.")
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}.")


@dataclass
class CuttlefishSwitch:
    """Whether to train with Cuttlefish; its settings are the fields of ``CuttlefishConfig`` (``--window 3``)."""

    cuttlefish: bool = field(default=False, metadata={"help": (
        "Train with Cuttlefish: full rank until the stable ranks settle, then low rank. The flags under 'Cuttlefish' "
        "configure it.")})


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments,
                                                            TrainingArguments, CuttlefishConfig | None]:
    """Flags (or one JSON file) -> arguments; every mistake exits with an argparse error before a model loads."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, CuttlefishSwitch, CuttlefishConfig,
                               TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            model_args, data_args, switch, config, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
        else:
            model_args, data_args, switch, config, training_args = parser.parse_args_into_dataclasses(argv)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if training_args.do_eval and data_args.task_name is None and data_args.validation_file is None:
        parser.error("--do_eval needs --validation_file (or a GLUE --task_name).")
    if not switch.cuttlefish:
        if config != CuttlefishConfig():
            logger.warning("Cuttlefish flags were given without --cuttlefish: this run trains without Cuttlefish.")
        return model_args, data_args, training_args, None
    return model_args, data_args, training_args, config


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()  # the default of get_process_log_level is passive
    log_level = training_args.get_process_log_level()
    for name in (__name__, "cuttlefish_hf"):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


# -- data ---------------------------------------------------------------------------------------------------------
def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> datasets.DatasetDict:
    """GLUE from the Hub, or the local files; MNLI's 'validation_matched' split is named 'validation'."""
    if data_args.task_name is not None:
        raw = datasets.load_dataset(GLUE_DATASET, data_args.task_name, cache_dir=cache_dir)
        if data_args.task_name == "mnli":
            raw["validation"] = raw["validation_matched"]
        return raw
    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    raw = datasets.load_dataset(data_args.train_file.rsplit(".", 1)[-1], data_files=files, cache_dir=cache_dir)
    for split, dataset in raw.items():
        if "label" not in dataset.column_names or len(dataset.column_names) < 2:
            raise ValueError(f"{files[split]} needs a 'label' column and one or two text columns; it has "
                             f"{dataset.column_names}.")
    if "validation" in raw and raw["train"].features["label"].dtype not in REGRESSION_DTYPES:
        seen = {str(value) for value in raw["train"].unique("label")}
        unseen = sorted({str(value) for value in raw["validation"].unique("label")} - seen)
        if unseen:
            raise ValueError(f"{files['validation']} has labels {unseen} that {files['train']} never has: the model "
                             f"would have no class for them. Add training rows with these labels or drop them from "
                             f"the validation file.")
    return raw


def text_columns(raw: datasets.DatasetDict, task_name: str | None) -> tuple[str, str | None]:
    """The one or two text columns: GLUE's, or 'sentence1'/'sentence2', or the first two non-label columns."""
    if task_name is not None:
        return TASK_TO_KEYS[task_name]
    names = [name for name in raw["train"].column_names if name != "label"]
    if "sentence1" in names and "sentence2" in names:
        return "sentence1", "sentence2"
    return (names[0], names[1]) if len(names) >= 2 else (names[0], None)


def label_names(raw: datasets.DatasetDict, task_name: str | None) -> list[str] | None:
    """Class names in id order (GLUE's, or the sorted distinct training labels of local data); None for regression."""
    if task_name is not None:
        return None if task_name == "stsb" else raw["train"].features["label"].names
    if raw["train"].features["label"].dtype in REGRESSION_DTYPES:
        return None
    return [str(value) for value in sorted(raw["train"].unique("label"))]


def tokenize(splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, columns: tuple[str, str | None],
             data_args: DataTrainingArguments, labels: list[str] | None) -> datasets.DatasetDict:
    """Tokenize (padding is left to the collator) and map local class values (names or numbers) to ids."""
    first, second = columns
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    to_id = None if labels is None or data_args.task_name else {name: i for i, name in enumerate(labels)}

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        result = tokenizer(*texts, truncation=True, max_length=max_length)
        if to_id is not None:
            result["label_id"] = [to_id[str(value)] for value in examples["label"]]
        return result

    if to_id is None:
        return splits.map(preprocess, batched=True, desc="Tokenizing")
    # A new column: ids written into "label" would be cast back to the labels' type (text for class names).
    splits = splits.map(preprocess, batched=True, remove_columns=["label"], desc="Tokenizing")
    return splits.rename_column("label_id", "label")


def first_rows(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


# -- model --------------------------------------------------------------------------------------------------------
def load_model(model_args: ModelArguments, task_name: str | None, labels: list[str] | None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model with a classification head for ``labels`` (one output for regression), and its tokenizer."""
    label_kwargs = {} if labels is None else {"id2label": dict(enumerate(labels)),
                                              "label2id": {name: i for i, name in enumerate(labels)}}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir,
                                        finetuning_task=task_name, num_labels=1 if labels is None else len(labels),
                                        **label_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                               cache_dir=model_args.cache_dir)
    return model, tokenizer


# -- metrics and outputs ------------------------------------------------------------------------------------------
def metric_function(task_name: str | None, regression: bool):
    """``compute_metrics`` for Trainer, from the GLUE metric module that ships next to this script."""
    metric = evaluate.load(METRIC_PATH, config_name=task_name or ("regression" if regression else "classification"))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if regression else np.argmax(logits, axis=1)
        return metric.compute(predictions=predictions, references=prediction.label_ids)

    return compute_metrics


def cuttlefish_outputs(trainer: Trainer) -> dict[str, Any]:
    """The Cuttlefish summary, and ``stable_ranks.png`` with the switch marked; empty for a vanilla run."""
    if not isinstance(trainer, CuttlefishTrainer) or trainer.cuttlefish.controller is None:
        return {}
    controller = trainer.cuttlefish.controller
    if trainer.is_world_process_zero():  # with no measurement (e.g. mode='si_fd') the figure says so
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        path = plot_stable_ranks(controller.tracker.history, controller.measured_steps,
                                 os.path.join(trainer.args.output_dir, "stable_ranks.png"),
                                 switch_step=controller.switch_step, full_ranks=controller.full_ranks)
        logger.info("Stable-rank heatmap and curves written to %s", path)
    return {"cuttlefish": controller.summary()}


def model_card_kwargs(model_args: ModelArguments, data_args: DataTrainingArguments) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs.update(language="en", dataset_tags="glue", dataset_args=data_args.task_name,
                      dataset=f"GLUE {data_args.task_name.upper()}")
    return kwargs


# -- the run ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the final train and eval metrics (with the Cuttlefish summary)."""
    model_args, data_args, training_args, cuttlefish_config = parse_arguments(argv)
    setup_logging(training_args)
    logger.info("Training arguments %s", training_args)
    if cuttlefish_config is not None:
        logger.info("Cuttlefish: %s", cuttlefish_config)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args.cache_dir)
    labels = label_names(raw, data_args.task_name)
    model, tokenizer = load_model(model_args, data_args.task_name, labels)
    splits = datasets.DatasetDict()
    if training_args.do_train:
        splits["train"] = first_rows(raw["train"], data_args.max_train_samples)
    if training_args.do_eval:
        splits["validation"] = first_rows(raw["validation"], data_args.max_eval_samples)
    with training_args.main_process_first(desc="dataset map pre-processing"):
        splits = tokenize(splits, tokenizer, text_columns(raw, data_args.task_name), data_args, labels)
    train_dataset, eval_dataset = splits.get("train"), splits.get("validation")

    trainer_kwargs = dict(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer,
                          compute_metrics=metric_function(data_args.task_name, regression=labels is None))
    if cuttlefish_config is None:
        trainer = Trainer(**trainer_kwargs)
    else:
        trainer = CuttlefishTrainer(**trainer_kwargs, cuttlefish_config=cuttlefish_config)

    results: dict[str, Any] = {}
    cuttlefish: dict[str, Any] = {}  # {"cuttlefish": summary} once a Cuttlefish run has trained
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # the tokenizer too; a factorized model carries its plan
        metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", metrics)
        cuttlefish = cuttlefish_outputs(trainer)
        trainer.save_metrics("train", {**metrics, **cuttlefish})
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset)}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", {**metrics, **cuttlefish})
        results.update(metrics)

    if training_args.push_to_hub:
        trainer.push_to_hub(**model_card_kwargs(model_args, data_args))
    else:
        trainer.create_model_card(**model_card_kwargs(model_args, data_args))
    return {**results, **cuttlefish}


if __name__ == "__main__":
    main()
