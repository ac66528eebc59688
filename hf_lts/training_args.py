"""`LTSTrainingArguments`: transformers' `TrainingArguments` with the LTS extras and LTS's DDP defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class LTSTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the LTS extras and DDP defaults that suit LTS.

    ``ddp_broadcast_buffers`` defaults to ``False``: the LTS state buffers are identical on every rank by
    construction (same weights after the all-reduced step, same seeded stochastic rounding), so
    broadcasting them before every forward would only double the traffic; BatchNorm running statistics stay
    per rank (the saved model is rank 0's). ``ddp_find_unused_parameters`` defaults to ``False``: every
    parameter gets a gradient, fully frozen weights included (an explicit zero, see `QuantConv2d`).
    """

    _argument_group_name = "training (transformers' TrainingArguments and the LTS extras)"

    quantizer_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the LSQ step sizes (no weight decay). Default: learning_rate."},
    )
    sync_batchnorm: bool = field(
        default=False,
        metadata={"help": "Convert BatchNorm to SyncBatchNorm under distributed training (GPU only)."},
    )
    skip_frozen_allreduce: bool = field(
        default=True,
        metadata={
            "help": "Under DDP, leave fully frozen weights (exact zero gradients) out of the gradient "
            "all-reduce; the result is bit-identical."
        },
    )
    ddp_broadcast_buffers: bool | None = field(
        default=False, metadata={"help": "DDP broadcast_buffers (LTS state is identical on all ranks)."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP find_unused_parameters (every parameter gets a gradient)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "hf-lts train: replace a model already saved in output_dir instead of refusing."},
    )
