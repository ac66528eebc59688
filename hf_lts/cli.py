"""The ``hf-lts`` command line (each command in `hf_lts.commands`): ``train`` (recipes, command-line overrides, the embedded demo) and ``eval``.

``hf-lts train`` parses four dataclasses with `HfArgumentParser` — `ModelArguments`, `DataArguments`,
`LTSConfig` and `LTSTrainingArguments` — so every field of each is a ``--field value`` option and a key of a
YAML recipe. Recipe values are the parser's defaults and command-line options override them. A recipe may
name a ``base:`` recipe (relative to itself) whose values it overrides, which keeps recipe families DRY.
Without ``--config`` the base is the demo recipe shipped with the package (``hf_lts/recipes/demo.yaml``): ``hf-lts
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

import sys
from collections.abc import Sequence

from .commands.errors import UsageError, one_line
from .commands.eval import eval_command
from .commands.export import export_command
from .commands.push import push_command
from .commands.train import train_command

COMMANDS = {
    "train": train_command,
    "eval": eval_command,
    "push": push_command,
    "export": export_command,
}
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
        print(f"hf-lts {command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
