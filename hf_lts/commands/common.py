"""What several commands do: build or load a model, load a dataset, check the output folder."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from ..data import load_image_dataset
from ..models import CONFIG_CLASSES, size_fields
from .arguments import DataArguments, ModelArguments
from .errors import UsageError, user_errors


def build_model(args: ModelArguments, id2label: dict[int, str], label2id: dict[str, int]) -> PreTrainedModel:
    """A pretrained classifier with its head resized to the labels, or a fresh one built from a config."""
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    overrides = config_overrides(args.config_overrides)
    if args.model_name_or_path is not None:
        with user_errors(f"cannot load model {args.model_name_or_path!r}"):
            config, unused = AutoConfig.from_pretrained(
                args.model_name_or_path, **labels, **overrides, return_unused_kwargs=True
            )
            check_config_fields(type(config), unused)
            return AutoModelForImageClassification.from_pretrained(
                args.model_name_or_path, config=config, ignore_mismatched_sizes=True
            )
    with user_errors():
        fields = size_fields(args.model_type, args.model_size)
    config_class = CONFIG_CLASSES[args.model_type]
    check_config_fields(config_class, overrides)
    with user_errors("bad model config"):
        config = config_class(**{**fields, **labels, **overrides})
        return AutoModelForImageClassification.from_config(config)


def check_config_fields(config_class: type, overrides: dict[str, Any]) -> None:
    """Refuse config fields the model does not have: `PretrainedConfig` would keep them as inert attributes."""
    unknown = sorted(set(overrides) - set(config_class().to_dict()))
    if unknown:
        raise UsageError(
            f"config_overrides: {', '.join(unknown)} {'is not a field' if len(unknown) == 1 else 'are not fields'} "
            f"of {config_class.__name__}: drop {'it' if len(unknown) == 1 else 'them'} or fix the spelling"
        )


def config_overrides(value: str | dict | None) -> dict[str, Any]:
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


def load_model(path: str) -> PreTrainedModel:
    """Load a model saved by `LTSTrainer` — the packed export or a training checkpoint — for evaluation.

    `from_pretrained` does it all through the ``"lts"`` quantizer that importing hf_lts registers
    (`hf_lts.quantizers`); this is the one place the CLI loads models, should that ever change.
    """
    return AutoModelForImageClassification.from_pretrained(path).eval()


def load_data(args: DataArguments, seed: int) -> Any:
    load_kwargs = {"name": args.dataset_config_name} if args.dataset_config_name else {}
    with user_errors(f"cannot load dataset {args.dataset_name!r}"):
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


def image_processor(name_or_path: str | None) -> Any:
    """The model's own image processor (its mean/std), if it has one; else `hf_lts.data` uses ImageNet's."""
    if name_or_path is None:
        return None
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


def check_output_dir(output_dir: str, overwrite: bool = True) -> list[Path]:
    """Fail before training, not at the first checkpoint, when ``output_dir`` cannot be written, or (unless
    ``overwrite``) when it already holds an export that training would replace.

    Returns the folders it had to create, for `remove_empty` to take back if the run fails before training.
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
    with user_errors(f"output_dir {output_dir!r} is not writable"):
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders `check_output_dir` created, innermost first, if nothing was written into them."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
