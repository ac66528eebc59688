"""``hf-lts eval``: the accuracy of a saved LTS model, printed as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..card import hub_id
from ..data import prepare_dataset
from ..trainer import LTSTrainer
from ..training_args import LTSTrainingArguments
from .arguments import DataArguments
from .common import check_output_dir, image_processor, load_data, load_model
from .errors import Parser, UsageError, user_errors


@dataclass
class EvalArguments:
    """What ``hf-lts eval`` evaluates and where it writes the results."""

    model: str = field(metadata={"help": "Folder (or Hub id) of a model saved by hf-lts / LTSTrainer."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    output_dir: str | None = field(default=None, metadata={"help": "Also write eval_results.json here."})


def eval_command(argv: Sequence[str]) -> int:
    """``hf-lts eval --model PATH --dataset NAME``: accuracy of a saved LTS model, printed as JSON."""
    parser = Parser((EvalArguments, DataArguments), prog="hf-lts eval", allow_abbrev=False)
    with user_errors():
        eval_args, data_args = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    if data_args.dataset_name is None:
        raise UsageError("no dataset: pass --dataset (e.g. --dataset digits)")
    if not os.path.isdir(eval_args.model) and not hub_id(eval_args.model):
        raise UsageError(
            f"model {eval_args.model!r}: no such folder (and not a Hub repo id): pass the output_dir of "
            "hf-lts train / trainer.save_model(), or a Hub id such as user/model"
        )
    with user_errors(f"cannot load model {eval_args.model!r}"):
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
    processor = image_processor(eval_args.model)
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
