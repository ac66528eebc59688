"""YAML recipes: the fields of ``hf-lts train``, merged over a ``base:`` recipe, under command-line options.

Without ``--config`` the base is the demo recipe shipped with the package (``hf_lts/recipes/demo.yaml``).
A recipe's ``model_size`` and ``config_overrides`` describe its own ``model_type``; a different
``--model_type`` on the command line drops them.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import LTSConfig
from ..training_args import LTSTrainingArguments
from .arguments import DataArguments, ModelArguments
from .errors import Parser, UsageError, one_line, user_errors

#: Recipe fields that describe the recipe's own model_type, dropped when the command line picks another one.
MODEL_SPECIFIC_FIELDS = ("model_size", "config_overrides")


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
        raise UsageError(f"recipe {str(path)!r} is not valid YAML: {one_line(e)}") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {str(path)!r} must be a mapping of field: value")
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    return {**load_recipe(path.parent / base, (*_seen, path.resolve())), **recipe}


#: What ``hf-lts train`` runs without ``--config``.
DEMO_RECIPE: dict[str, Any] = load_recipe(Path(str(files("hf_lts") / "recipes" / "demo.yaml")))


def train_parser() -> Parser:
    parser = Parser(
        (ModelArguments, DataArguments, LTSConfig, LTSTrainingArguments),
        prog="hf-lts train",
        usage="hf-lts train [--config RECIPE.yaml] [--FIELD VALUE ...]",
        description="LTS quantization-aware training. Without --config, the embedded demo recipe is the base; "
        "every option below is also a recipe key, and the command line wins over the recipe.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML recipe; command-line options override its values.")
    lts_help = docstring_args(LTSConfig)
    for action in parser._actions:
        if action.dest in ("first_layer_bits", "last_layer_bits"):  # "none" keeps the layer in fp32
            action.type = int_or_none
        if action.dest in lts_help and not action.help:
            action.help = lts_help[action.dest].replace("%", "%%")
    return parser


def parse_train_args(
    argv: Sequence[str],
) -> tuple[ModelArguments, DataArguments, LTSConfig, LTSTrainingArguments]:
    """Parse ``hf-lts train`` arguments: recipe (``--config``, else the demo) then command-line overrides."""
    parser = train_parser()
    config_path = option_value(argv, "--config")
    recipe = dict(DEMO_RECIPE) if config_path is None else load_recipe(config_path)
    model_type = option_value(argv, "--model_type")
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
    with user_errors():
        *parsed, _extra, remaining = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    if remaining:
        raise UsageError(f"unknown argument(s) {' '.join(remaining)} (see hf-lts train --help)")
    model_args, data_args, lts_config, training_args = parsed
    if data_args.dataset_name is None:
        raise UsageError("no dataset: set dataset_name (e.g. --dataset_name digits)")
    return model_args, data_args, lts_config, training_args


def option_value(argv: Sequence[str], option: str) -> str | None:
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


def docstring_args(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style class docstring, one line each: the option help of ``cls``'s
    fields, in the very words of its documentation."""
    doc = inspect.cleandoc(cls.__doc__ or "").split("Args:", 1)[-1]
    entries: dict[str, str] = {}
    for names, text in re.findall(r"^\s{4}(\w[\w, ]*):\s(.*?)(?=^\s{4}\w[\w, ]*:\s|\Z)", doc, re.M | re.S):
        for name in names.split(", "):
            entries[name] = " ".join(text.replace("``", "").split())
    return entries


def int_or_none(value: str) -> int | None:
    return None if value.lower() in ("none", "null") else int(value)
