"""The ``hf-lts`` command line: ``train`` (recipes, command-line overrides, the embedded demo) and ``eval``.

``hf-lts train`` parses four dataclasses with `HfArgumentParser` — `ModelArguments`, `DataArguments`,
`LTSConfig` and `LTSTrainingArguments` — so every field of each is a ``--field value`` option and a key of a
YAML recipe. Recipe values are the parser's defaults and command-line options override them. A recipe may
name a ``base:`` recipe (relative to itself) whose values it overrides, which keeps recipe families DRY.
Without ``--config`` the base is the embedded demo (`DEMO_RECIPE`, also ``recipes/demo.yaml``): ``hf-lts
train`` alone trains a small ResNet with LTS W4A4 on scikit-learn's digits in well under three minutes on
two CPU cores.

A recipe's ``model_size`` and ``config_overrides`` describe its own ``model_type``; a different
``--model_type`` on the command line drops them. The model is built after seeding, so the same command gives
bit-identical weights.

User mistakes (unknown field, a config field the model does not have, bad value, missing recipe,
unwritable output folder, one that already holds a saved model, dataset without image/label columns, …)
end with one ``hf-lts <command>: error: …`` line and exit status 2, leaving no new folder behind.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from transformers import HfArgumentParser, PreTrainedModel

from .card import hub_id
from .config import LTSConfig
from .trainer import LTSTrainer, LTSTrainingArguments

#: What ``hf-lts train`` runs without ``--config`` (``recipes/demo.yaml`` holds the same, for reading).
DEMO_RECIPE: dict[str, Any] = {
    "model_type": "resnet",
    "config_overrides": {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]},
    "torch_num_threads": 1,
    "dataset_name": "digits",
    "image_size": 32,
    "hflip": False,
    "weight_bits": 4,
    "activation_bits": 4,
    "output_dir": "lts-output",
    "num_train_epochs": 10,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 256,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "learning_rate": 0.1,
    "weight_decay": 5e-5,
    "lr_scheduler_type": "cosine",
    "logging_strategy": "epoch",
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "report_to": "none",
    "dataloader_pin_memory": False,
    "seed": 0,
}

RESNET_SIZES: dict[str, dict[str, Any]] = {
    "18": {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]},
    "34": {"layer_type": "basic", "depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 256, 512]},
    "50": {"layer_type": "bottleneck", "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048]},
    "101": {"layer_type": "bottleneck", "depths": [3, 4, 23, 3], "hidden_sizes": [256, 512, 1024, 2048]},
    "152": {"layer_type": "bottleneck", "depths": [3, 8, 36, 3], "hidden_sizes": [256, 512, 1024, 2048]},
}
MODEL_TYPES = ("resnet", "mobilenet_v2")
#: Recipe fields that describe the recipe's own model_type, dropped when the command line picks another one.
MODEL_SPECIFIC_FIELDS = ("model_size", "config_overrides")


class UsageError(Exception):
    """A mistake of the user's: reported as one line, exit status 2."""


@dataclass
class ModelArguments:
    """Which model to train: a pretrained one, or one built from a config (random initialisation)."""

    _argument_group_name = "model"  # `HfArgumentParser` puts each dataclass's options under its own heading

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder of a pretrained image classifier; its head is resized to the labels."
        },
    )
    model_type: str = field(
        default="resnet",
        metadata={
            "help": "Architecture built from a config when model_name_or_path is unset.",
            "choices": MODEL_TYPES,
        },
    )
    model_size: str | None = field(
        default=None,
        metadata={
            "help": f"resnet: one of {list(RESNET_SIZES)} (default 18); mobilenet_v2: the width multiplier "
            "(default 1.0)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Fields of the model_type's config to change, as a JSON object (a mapping in YAML), e.g. "
            '{"depths": [1, 1]}. A recipe\'s model_size and config_overrides apply to its own model_type only.'
        },
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads; 1 suits tiny models, whose ops are too small for threads."
        },
    )


@dataclass
class DataArguments:
    """Which images to train and evaluate on, and how to preprocess them (`hf_lts.data`)."""

    _argument_group_name = "data"

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "digits, fashion_mnist, a folder (save_to_disk or imagefolder) or a Hub dataset id.",
            "aliases": ["--dataset"],
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on (default: validation/val/test, else a fifth of train)."},
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Column of the images (default: guessed)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Column of the labels (default: guessed)."}
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the square model input (train: default 224; eval: the model's config.image_size)."
        },
    )
    crop: str = field(
        default="auto",
        metadata={
            "help": "auto, padded (CIFAR style) or resized (ImageNet style).",
            "choices": ("auto", "padded", "resized"),
        },
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N examples only."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples only."}
    )


@dataclass
class EvalArguments:
    """What ``hf-lts eval`` evaluates and where it writes the results."""

    model: str = field(metadata={"help": "Folder (or Hub id) of a model saved by hf-lts / LTSTrainer."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    output_dir: str | None = field(default=None, metadata={"help": "Also write eval_results.json here."})


class _Parser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- recipes ---------------------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The fields of a YAML recipe, merged over those of its ``base:`` recipe (recursively)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe {str(path)!r} not found")
    if path.resolve() in _seen:
        raise UsageError(f"recipe {str(path)!r} is its own base")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {str(path)!r} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {str(path)!r} must be a mapping of field: value")
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    return {**load_recipe(path.parent / base, (*_seen, path.resolve())), **recipe}


def train_parser() -> _Parser:
    parser = _Parser(
        (ModelArguments, DataArguments, LTSConfig, LTSTrainingArguments),
        prog="hf-lts train",
        usage="hf-lts train [--config RECIPE.yaml] [--FIELD VALUE ...]",
        description="LTS quantization-aware training. Without --config, the embedded demo recipe is the base; "
        "every option below is also a recipe key, and the command line wins over the recipe.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML recipe; command-line options override its values.")
    lts_help = _docstring_args(LTSConfig)
    for action in parser._actions:
        if action.dest in ("first_layer_bits", "last_layer_bits"):  # "none" keeps the layer in fp32
            action.type = _int_or_none
        if action.dest in lts_help and not action.help:
            action.help = lts_help[action.dest].replace("%", "%%")
    return parser


def parse_train_args(
    argv: Sequence[str],
) -> tuple[ModelArguments, DataArguments, LTSConfig, LTSTrainingArguments]:
    """Parse ``hf-lts train`` arguments: recipe (``--config``, else the demo) then command-line overrides."""
    parser = train_parser()
    config_path = _option_value(argv, "--config")
    recipe = dict(DEMO_RECIPE) if config_path is None else load_recipe(config_path)
    model_type = _option_value(argv, "--model_type")
    if model_type is not None and model_type != recipe.get("model_type", "resnet"):
        # The recipe's model shape belongs to its own model_type (ResNet's hidden_sizes mean nothing to a
        # MobileNetV2, and its model_size "18" would be an 18x width multiplier).
        for name in MODEL_SPECIFIC_FIELDS:
            recipe.pop(name, None)
    dests = {action.dest: action for action in parser._actions}
    unknown = sorted(set(recipe) - set(dests) - {"help", "config"})
    if unknown:
        raise UsageError(f"recipe {config_path or 'demo'}: unknown field(s) {', '.join(unknown)}")
    for name, value in recipe.items():
        if dests[name].nargs == "+" and isinstance(value, str):
            recipe[name] = [value]
    # On a machine without an accelerator, use_cpu lets `torchrun`/`accelerate launch` run DDP over gloo
    # (without it transformers stays single-process on CPU even when launched on several).
    defaults = {"output_dir": "lts-output", "use_cpu": not torch.accelerator.is_available()}
    parser.set_defaults(**{**defaults, **recipe})
    with _user_errors():
        *parsed, _extra, remaining = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    if remaining:
        raise UsageError(f"unknown argument(s) {' '.join(remaining)} (see hf-lts train --help)")
    model_args, data_args, lts_config, training_args = parsed
    if data_args.dataset_name is None:
        raise UsageError("no dataset: set dataset_name (e.g. --dataset_name digits)")
    return model_args, data_args, lts_config, training_args


# -- building blocks -------------------------------------------------------------------------------------
def build_model(args: ModelArguments, id2label: dict[int, str], label2id: dict[str, int]) -> PreTrainedModel:
    """A pretrained classifier with its head resized to the labels, or a fresh one built from a config."""
    from transformers import AutoConfig, AutoModelForImageClassification, MobileNetV2Config, ResNetConfig

    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    overrides = _config_overrides(args.config_overrides)
    if args.model_name_or_path is not None:
        with _user_errors(f"cannot load model {args.model_name_or_path!r}"):
            config, unused = AutoConfig.from_pretrained(
                args.model_name_or_path, **labels, **overrides, return_unused_kwargs=True
            )
            _check_config_fields(type(config), unused)
            return AutoModelForImageClassification.from_pretrained(
                args.model_name_or_path, config=config, ignore_mismatched_sizes=True
            )
    if args.model_type == "resnet":
        size = args.model_size or "18"
        if size not in RESNET_SIZES:
            raise UsageError(f"model_size={size!r}: resnet sizes are {list(RESNET_SIZES)}")
        config_class, fields = ResNetConfig, RESNET_SIZES[size]
    else:
        try:
            fields = {"depth_multiplier": float(args.model_size or "1.0")}
        except ValueError:
            raise UsageError(
                f"model_size={args.model_size!r}: mobilenet_v2 takes a width multiplier"
            ) from None
        config_class = MobileNetV2Config
    _check_config_fields(config_class, overrides)
    with _user_errors("bad model config"):
        config = config_class(**{**fields, **labels, **overrides})
        return AutoModelForImageClassification.from_config(config)


def _check_config_fields(config_class: type, overrides: dict[str, Any]) -> None:
    """Refuse config fields the model does not have: `PretrainedConfig` would keep them as inert attributes."""
    unknown = sorted(set(overrides) - set(config_class().to_dict()))
    if unknown:
        raise UsageError(
            f"config_overrides: {', '.join(unknown)} {'is not a field' if len(unknown) == 1 else 'are not fields'} "
            f"of {config_class.__name__}: drop {'it' if len(unknown) == 1 else 'them'} or fix the spelling"
        )


def load_model(path: str) -> PreTrainedModel:
    """Load a model saved by `LTSTrainer` — the packed export or a training checkpoint — for evaluation.

    `from_pretrained` does it all through the ``"lts"`` quantizer that importing hf_lts registers
    (`hf_lts.quantizers`); this is the one place the CLI loads models, should that ever change.
    """
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path).eval()


def load_data(args: DataArguments, seed: int) -> Any:
    from .data import load_image_dataset

    load_kwargs = {"name": args.dataset_config_name} if args.dataset_config_name else {}
    with _user_errors(f"cannot load dataset {args.dataset_name!r}"):
        data = load_image_dataset(
            args.dataset_name,
            train_split=args.train_split,
            eval_split=args.eval_split,
            data_dir=args.data_dir,
            image_column=args.image_column,
            label_column=args.label_column,
            seed=seed,
            **load_kwargs,
        )
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    return data


def check_output_dir(output_dir: str, overwrite: bool = True) -> list[Path]:
    """Fail before training, not at the first checkpoint, when ``output_dir`` cannot be written, or (unless
    ``overwrite``) when it already holds an export that training would replace.

    Returns the folders it had to create, for `_remove_empty` to take back if the run fails before training.
    """
    path = Path(output_dir)
    if not overwrite and (path / "config.json").exists():
        raise UsageError(
            f"output_dir {output_dir!r} already holds a saved model: pass --overwrite_output_dir true to "
            "replace it, or choose another --output_dir"
        )
    created, parent = [], path.absolute()
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    with _user_errors(f"output_dir {output_dir!r} is not writable"):
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders `check_output_dir` created, innermost first, if nothing was written into them."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


# -- commands --------------------------------------------------------------------------------------------
def train_command(argv: Sequence[str]) -> int:
    """``hf-lts train``: build, train, evaluate, save, write the model card, print the summary."""
    start = time.perf_counter()
    model_args, data_args, lts_config, training_args = parse_train_args(argv)
    overwrite = training_args.overwrite_output_dir or training_args.resume_from_checkpoint is not None
    created = check_output_dir(training_args.output_dir, overwrite=overwrite)
    if model_args.torch_num_threads is not None:
        torch.set_num_threads(model_args.torch_num_threads)

    from transformers import enable_full_determinism, set_seed

    from .data import label_maps, prepare_dataset

    try:
        data = load_data(data_args, training_args.seed)
        id2label, label2id = label_maps(data)
        # Seeded before the model is built, so that its initial weights, like everything after, depend on
        # the seed alone: the same command gives bit-identical weights (the Trainer seeds only later).
        (enable_full_determinism if training_args.full_determinism else set_seed)(training_args.seed)
        model = build_model(model_args, id2label, label2id)
    except UsageError:
        _remove_empty(created)
        raise
    image_size = data_args.image_size or 224
    model.config.image_size = image_size  # read back by `hf-lts eval`
    processor = _image_processor(model_args.model_name_or_path)
    datasets = {
        split: prepare_dataset(
            data[split],
            image_size,
            split == "train",
            crop=data_args.crop,
            hflip=data_args.hflip,
            image_processor=processor,
        )
        for split in ("train", "validation")
    }
    trainer = LTSTrainer(
        model=model,
        args=training_args,
        lts_config=lts_config,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        processing_class=processor,
    )

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    trainer.create_model_card(dataset=data_args.dataset_name, finetuned_from=model_args.model_name_or_path)
    if trainer.is_world_process_zero():
        _print_summary(trainer, metrics, time.perf_counter() - start)
    return 0


def eval_command(argv: Sequence[str]) -> int:
    """``hf-lts eval --model PATH --dataset NAME``: accuracy of a saved LTS model, printed as JSON."""
    from .data import prepare_dataset

    parser = _Parser((EvalArguments, DataArguments), prog="hf-lts eval", allow_abbrev=False)
    with _user_errors():
        eval_args, data_args = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    if data_args.dataset_name is None:
        raise UsageError("no dataset: pass --dataset (e.g. --dataset digits)")
    if not os.path.isdir(eval_args.model) and not hub_id(eval_args.model):
        raise UsageError(
            f"model {eval_args.model!r}: no such folder (and not a Hub repo id): pass the output_dir of "
            "hf-lts train / trainer.save_model(), or a Hub id such as user/model"
        )
    with _user_errors(f"cannot load model {eval_args.model!r}"):
        model = load_model(eval_args.model)
    image_size = data_args.image_size or getattr(model.config, "image_size", None)
    if not isinstance(image_size, int):
        raise UsageError(f"{eval_args.model} does not record its input size: pass --image_size")
    data = load_data(data_args, seed=0)
    if len(data["validation"].features["label"].names) > model.config.num_labels:
        raise UsageError(
            f"the dataset has {len(data['validation'].features['label'].names)} classes, the model "
            f"{model.config.num_labels}"
        )
    processor = _image_processor(eval_args.model)
    dataset = prepare_dataset(
        data["validation"], image_size, False, crop=data_args.crop, image_processor=processor
    )
    with contextlib.ExitStack() as stack:
        output_dir = eval_args.output_dir or stack.enter_context(tempfile.TemporaryDirectory())
        check_output_dir(output_dir)
        args = LTSTrainingArguments(
            output_dir=output_dir,
            per_device_eval_batch_size=eval_args.per_device_eval_batch_size,
            report_to="none",
            dataloader_pin_memory=False,
        )
        trainer = LTSTrainer(model=model, args=args, eval_dataset=dataset)
        metrics = trainer.evaluate()
        if eval_args.output_dir is not None:
            trainer.save_metrics("eval", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


def push_command(argv: Sequence[str]) -> int:
    """``hf-lts push --repo-id ID PATH``: upload an LTS export folder, with its model card, to the Hub.

    The token comes from ``HF_TOKEN`` or ``hf auth login``, never from the command line (shell history).
    """
    import argparse

    from .hub import HubUploadError, push_export

    parser = argparse.ArgumentParser(
        prog="hf-lts push", description="Upload an LTS export to the Hugging Face Hub."
    )
    parser.add_argument("path", help="the export folder (model.save_pretrained / trainer.save_model output)")
    parser.add_argument(
        "--repo-id", "--repo_id", required=True, help="the Hub model repo, e.g. me/resnet18-w2a2"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="the branch to commit to (default: main)")
    parser.add_argument("--commit-message", "--commit_message", help="the commit message")
    args = parser.parse_args(argv)
    try:
        with _user_errors():
            commit = push_export(
                args.path,
                args.repo_id,
                private=args.private or None,
                revision=args.revision,
                commit_message=args.commit_message,
            )
    except HubUploadError as e:
        print(f"hf-lts push: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print(
        f"Uploaded {args.path} to {commit.repo_url}\nLoad it with: import hf_lts; "
        f"AutoModelForImageClassification.from_pretrained({commit.repo_url.repo_id!r})"
    )
    return 0


def export_command(argv: Sequence[str]) -> int:
    """``hf-lts export --format onnx MODEL_DIR``: write ``model.onnx`` (ONNX QDQ) beside the packed export.

    MODEL_DIR is an export folder, a local checkpoint folder or a Hub id. The file goes into ``--output``,
    by default MODEL_DIR itself when it is a local folder, else ``./<repo name>``; an output folder other
    than MODEL_DIR also receives the packed export, so that it can be pushed as it is.
    """
    import argparse

    from .card import add_deploy_section, hub_id
    from .export import ONNX_FILE
    from .export.onnx import export_onnx, require_onnx
    from .export.packed import save_export

    parser = argparse.ArgumentParser(
        prog="hf-lts export", description="Export a trained LTS model to a deployable format."
    )
    parser.add_argument(
        "model", metavar="MODEL_DIR", help="an export folder, a checkpoint folder or a Hub id"
    )
    parser.add_argument("--format", required=True, choices=["onnx"], help="onnx: an ONNX QDQ model.onnx")
    parser.add_argument("--output", help="the folder to write to (default: MODEL_DIR, or ./<repo name>)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: 21; native 2-bit types: 25)")
    parser.add_argument(
        "--weight-type",
        choices=["int8", "native"],
        default="int8",
        help="int8: every bit width in int8/uint8, runs on ONNX Runtime's integer kernels (default); "
        "native: int2/int4 types, a smaller file on float kernels",
    )
    parser.add_argument(
        "--image-size",
        "--image_size",
        type=int,
        help="side of the example input (default: config.image_size); any size runs unless --fixed-size",
    )
    parser.add_argument(
        "--fixed-size", action="store_true", help="fix height and width to --image-size in the graph"
    )
    args = parser.parse_args(argv)
    local = Path(args.model).is_dir()
    output = Path(args.output or (args.model if local else Path(args.model).name))
    try:
        require_onnx()  # before loading the model
    except ImportError as e:
        raise UsageError(_one_line(e)) from e
    with _user_errors(f"cannot export {args.model}"):
        model = load_model(args.model)
        size = args.image_size or getattr(model.config, "image_size", None) or 224
        example = torch.zeros(2, getattr(model.config, "num_channels", 3), size, size)
        if not (local and output.resolve() == Path(args.model).resolve()):
            save_export(model, output)
        path = export_onnx(
            model,
            output / ONNX_FILE,
            example_inputs=example,
            opset=args.opset,
            weight_type=args.weight_type,
            dynamic_size=not args.fixed_size,
        )
        add_deploy_section(output, hub_id(None if local else args.model))
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


COMMANDS = {"train": train_command, "eval": eval_command, "push": push_command, "export": export_command}
USAGE = """usage: hf-lts {train,eval,push,export} [options]

  train   LTS quantization-aware training (no options: the CPU demo on digits)
          hf-lts train [--config recipe.yaml] [--any_field value ...]
  eval    evaluate a saved LTS model
          hf-lts eval --model PATH --dataset NAME [--image_size N]
  push    upload an LTS export folder with its model card to the Hugging Face Hub
          hf-lts push --repo-id ID PATH [--private] [--revision BRANCH]
  export  write a deployable model.onnx (ONNX QDQ) beside an LTS export
          hf-lts export --format onnx MODEL_DIR [--output DIR] [--opset N]

Run hf-lts <command> --help for every option."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        print(
            f"hf-lts: error: unknown command {command!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    try:
        return COMMANDS[command](rest)
    except UsageError as e:
        print(f"hf-lts {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


# -- helpers ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _user_errors(context: str | None = None) -> Iterator[None]:
    """Turn the errors that a bad argument, path or dataset raises into a `UsageError`."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as e:
        message = _one_line(e)
        raise UsageError(f"{context}: {message}" if context else message) from e


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _option_value(argv: Sequence[str], option: str) -> str | None:
    """The value of ``option`` in ``argv`` (``--opt value`` or ``--opt=value``), read before full parsing."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option:
            if i + 1 >= len(argv):
                raise UsageError(f"{option} needs a value")
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def _docstring_args(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style class docstring, one line each: the option help of ``cls``'s
    fields, in the very words of its documentation."""
    doc = inspect.cleandoc(cls.__doc__ or "").split("Args:", 1)[-1]
    entries: dict[str, str] = {}
    for names, text in re.findall(r"^\s{4}(\w[\w, ]*):\s(.*?)(?=^\s{4}\w[\w, ]*:\s|\Z)", doc, re.M | re.S):
        for name in names.split(", "):
            entries[name] = " ".join(text.replace("``", "").split())
    return entries


def _int_or_none(value: str) -> int | None:
    return None if value.lower() in ("none", "null") else int(value)


def _config_overrides(value: str | dict | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UsageError(f"config_overrides is not a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"config_overrides must be a mapping of config field: value, got {value!r}")
    return value


def _image_processor(name_or_path: str | None) -> Any:
    """The model's own image processor (its mean/std), if it has one; else `hf_lts.data` uses ImageNet's."""
    if name_or_path is None:
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


def _print_summary(trainer: LTSTrainer, metrics: dict[str, float], seconds: float) -> None:
    stats = trainer.scratcher.stats()
    config = trainer.lts_config
    rows = [
        ("eval accuracy", f"{metrics.get('eval_accuracy', float('nan')):.4f}"),
        ("eval top-5 accuracy", f"{metrics.get('eval_top5_accuracy', float('nan')):.4f}"),
        ("frozen weights", f"{stats['frozen_ratio']:.1%}"),
        ("weight updates saved", f"{stats['weight_updates_saved']:.1%}"),
        ("backward FLOPs saved, counted", f"{stats['backward_flops_saved']:.1%}"),
        ("backward FLOPs saved, realised", f"{stats['backward_flops_saved_realised']:.1%}"),
        ("optimizer steps", str(stats["step"])),
        ("wall time", f"{seconds:.1f} s"),
        ("saved to", trainer.args.output_dir),
    ]
    title = f"LTS W{config.weight_bits}A{config.activation_bits} summary"
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n{'-' * len(title)}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
