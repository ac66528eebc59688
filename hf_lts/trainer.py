"""`LTSTrainer`: a transformers `Trainer` that runs LTS quantization-aware training.

Everything goes through the Trainer's public hooks (`create_optimizer`, `get_decay_parameter_names`,
callbacks in `hf_lts.callbacks`, `log`, `save_model`, `create_model_card`) but one, `_push_from_checkpoint`,
whose docstring says why; the training loop itself is the Trainer's, so it keeps working across
transformers releases. The arguments are in `hf_lts.training_args`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import (
    PreTrainedModel,
    Trainer,
    TrainerState,
    TrainingArguments,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import HubStrategy, TrainOutput, load_sharded_checkpoint
from transformers.training_args import ParallelMode
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .callbacks import CheckpointCompleteCallback, FrozenAllReduceCallback, LTSCallback
from .card import write_model_card
from .config import LTSConfig
from .distributed import FrozenAwareAllReduceState
from .export import ONNX_FILE
from .export.onnx import refresh_onnx
from .hub import push_export, upload_errors
from .metrics import compute_metrics as accuracy_metrics
from .optimizer import group_step_sizes, no_decay_parameter_names
from .quantization import prepare_model
from .quantizers import training_state
from .resilience import (
    background_push,
    copy_metrics_files,
    dead_rank_error,
    destroy_process_group_at_exit,
    is_collective_failure,
    resolve_resume,
    unmark_checkpoint,
)
from .scratcher import LotteryTicketScratcher
from .training_args import LTSTrainingArguments

logger = logging.getLogger(__name__)

#: The statistics logged at every logging step, as ``lts/<name>`` (LTS.md §5).
LOGGED_STATS = (
    "frozen_ratio",
    "weight_updates_saved",
    "backward_flops_saved",
    "backward_flops_saved_realised",
)


def _default_collator():
    """`hf_lts.data.collate_fn`, imported on use: `hf_lts.data` imports `datasets` (0.6 s), which a model
    loaded with ``import hf_lts`` and trained without the Trainer's default collation never needs."""
    from .data import collate_fn

    return collate_fn


class LTSTrainer(Trainer):
    """A `Trainer` for LTS quantization-aware training (``hf_lts/LTS.md``).

    Args:
        model: a model to prepare with ``lts_config`` (`hf_lts.prepare_model`), or one already prepared, whose
            own ``model.lts_config`` then applies (passing a different ``lts_config`` is an error).
        args: `LTSTrainingArguments` (default: ``LTSTrainingArguments("trainer_output")``; a plain
            `TrainingArguments` works too, its unset DDP options then get the LTS defaults).
        lts_config: the `LTSConfig` of an unprepared model (default: ``LTSConfig()``, W4A4).
        data_collator: default `hf_lts.data.collate_fn` (``pixel_values`` / ``labels`` examples).
        compute_metrics: default top-1/top-5 accuracy (``eval_accuracy``, ``eval_top5_accuracy``).
        **kwargs: the other `Trainer` arguments.

    The scratcher (``trainer.scratcher``) is stepped once per optimizer step with ``T = state.max_steps``.
    LSQ step sizes form their own parameter group (``quantizer_learning_rate``, no weight decay); norm
    layers and biases get no weight decay either. ``lts/frozen_ratio``, ``lts/weight_updates_saved`` and
    ``lts/backward_flops_saved`` (the paper's count) and ``lts/backward_flops_saved_realised`` (the
    weight-gradient work the backward actually skipped) are logged at every logging step to every
    ``report_to`` integration.

    Mixed precision (``bf16``/``fp16``): the fake quantizers always compute in fp32 (they cast their input
    to float), the step sizes and latent weights stay fp32 parameters and the LTS state is an int32 buffer,
    so levels, distances and freezing are unaffected; autocast only runs the convolutions/matmuls — on the
    fake-quantized ``q · s``, rounded to the half type — and the layers between them in 16 bits. fp16 adds
    the GradScaler: see `LTSCallback` for its skipped steps.

    Checkpoints (``checkpoint-N/``) hold the full training state — latent fp32 weights and every LTS
    buffer — so ``resume_from_checkpoint`` continues exactly; the final `save_model` writes the packed
    export (`export_model`).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        lts_config: LTSConfig | None = None,
        data_collator: Any = None,
        compute_metrics: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError(
                "LTSTrainer needs a model (model_init is not supported: the model is prepared for LTS once)."
            )
        model = self._prepare(model, lts_config)
        args = args if args is not None else LTSTrainingArguments("trainer_output")
        for name in ("ddp_broadcast_buffers", "ddp_find_unused_parameters"):
            if getattr(args, name) is None:
                setattr(args, name, False)
        if getattr(args, "sync_batchnorm", False) and args.parallel_mode == ParallelMode.DISTRIBUTED:
            if args.device.type == "cpu":
                raise ValueError("sync_batchnorm=True needs GPUs: torch's SyncBatchNorm does not run on CPU.")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator if data_collator is not None else _default_collator(),
            compute_metrics=compute_metrics if compute_metrics is not None else accuracy_metrics,
            **kwargs,
        )
        # Image classifiers take **kwargs, so the Trainer would treat their loss as normalised by
        # `num_items_in_batch`: it would then skip the division by gradient_accumulation_steps and, with
        # average_tokens_across_devices under DDP, multiply the loss by the world size. But their loss is a
        # plain per-batch mean that ignores those kwargs, so both would scale the gradient (by the
        # accumulation steps, by the number of processes). With this off, the loss is the micro-batch mean
        # divided by the accumulation steps and DDP averages over ranks: the gradient of a global batch is
        # the same for any number of processes.
        self.model_accepts_loss_kwargs = False
        # transformers classifiers whose forward takes no labels (DeiT's and LeViT's distilled *WithTeacher
        # models): the Trainer keeps the labels column and computes their loss itself (`compute_loss`).
        self._loss_from_logits = isinstance(model, PreTrainedModel) and (
            "labels" not in inspect.signature(model.forward).parameters
        )
        if self._loss_from_logits and self.args.label_names is None:
            self.label_names = ["labels"]
        self.scratcher = LotteryTicketScratcher(self.model, total_steps=max(1, self.args.max_steps))
        self.add_callback(LTSCallback(self.scratcher))
        #: Bytes the gradient all-reduce sent / would have sent by default, under DDP (`hf_lts.distributed`).
        self.allreduce_state: FrozenAwareAllReduceState | None = None
        if getattr(self.args, "skip_frozen_allreduce", True):
            self.add_callback(FrozenAllReduceCallback(self))
        self.add_callback(CheckpointCompleteCallback(self))
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED:
            destroy_process_group_at_exit(self._release_process_group)
        self._checkpoint_push: Future | None = None

    def _release_process_group(self) -> None:
        """At exit, before the process group is destroyed: drop the DDP wrapper (its reducer holds the group)
        from the Trainer and Accelerate, so that it can be collected while the interpreter is whole."""
        self.model_wrapped = self.model
        self.allreduce_state = None
        self.accelerator.free_memory()

    @staticmethod
    def _prepare(model: nn.Module, lts_config: LTSConfig | None) -> nn.Module:
        existing = getattr(model, "lts_config", None)
        if existing is None:
            return prepare_model(model, lts_config if lts_config is not None else LTSConfig())
        if lts_config is not None and lts_config.to_dict() != existing.to_dict():
            raise ValueError(
                "The model is already prepared for LTS with a different config: its model.lts_config "
                f"{existing.to_dict()} conflicts with lts_config={lts_config.to_dict()}. Drop lts_config "
                "(the model's own config applies) or pass an unprepared model."
            )
        return model

    @property
    def lts_config(self) -> LTSConfig:
        return self.scratcher.config

    # -- optimizer ---------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Transformers' choice (no biases, no LayerNorm) minus every norm layer (BatchNorm included, whose HF
        names such as ``normalization`` escape transformers' patterns) and the LSQ step sizes."""
        excluded = set(no_decay_parameter_names(model))
        return [n for n in super().get_decay_parameter_names(model) if n not in excluded]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (any ``optim``), with the LSQ step sizes moved into a group of their own.

        They are moved right after construction, before any step, when the optimizer has no state yet; the
        learning-rate scheduler, created afterwards, scales that group's rate like the others.
        """
        if self.optimizer is not None:  # passed in by the user: theirs to group
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "quantizer_learning_rate", None)
        lr = self.args.learning_rate if lr is None else lr
        group_step_sizes(optimizer, self.model if model is None else model, lr)
        return optimizer

    # -- logging -----------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's own loss; for a classifier whose forward takes no labels, cross-entropy of its logits
        — of a distilled model, the mean over its class and distillation heads, the hard-label distillation
        of DeiT with the labels in place of the teacher's predictions."""
        if not self._loss_from_logits or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        heads = [getattr(outputs, k, None) for k in ("cls_logits", "distillation_logits")]
        if any(h is None for h in heads):
            heads = [outputs.logits]
        loss = torch.stack([F.cross_entropy(h, labels) for h in heads]).mean()
        return (loss, ImageClassifierOutput(logits=outputs.logits)) if return_outputs else loss

    def lts_metrics(self) -> dict[str, float]:
        """``lts/frozen_ratio``, ``lts/weight_updates_saved``, ``lts/backward_flops_saved`` now, and under DDP
        ``lts/allreduce_bytes_saved`` (the share of gradient all-reduce bytes not sent so far)."""
        stats = self.scratcher.stats()
        metrics = {f"lts/{name}": float(stats[name]) for name in LOGGED_STATS}
        if self.allreduce_state is not None and self.allreduce_state.bytes_default:
            sent, default = self.allreduce_state.bytes_sent, self.allreduce_state.bytes_default
            metrics["lts/allreduce_bytes_saved"] = 1 - sent / default
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the LTS statistics to the training logs (logging steps and the final summary), so that every
        ``report_to`` integration receives them."""
        if "loss" in logs or "train_loss" in logs:
            logs.update(self.lts_metrics())
        super().log(logs, start_time)

    # -- faults ------------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        """`Trainer.train`, resuming only from a complete checkpoint and failing clearly when a process dies.

        ``resume_from_checkpoint=True`` (or ``"last"``/``"true"``, as ``--resume_from_checkpoint`` gives them)
        takes the newest *complete* ``checkpoint-N`` and logs each newer, partial one it skips; a folder passed
        explicitly must be complete. Under DDP, a collective that fails because another process died or
        outlived ``ddp_timeout`` ends training with one line naming the checkpoint to resume from.
        """
        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None and self.args.max_steps > 0:
            finished = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
            if finished.global_step >= self.args.max_steps:
                return self._load_finished_run(checkpoint, finished)
        try:
            return super().train(checkpoint, trial, ignore_keys_for_eval)
        except Exception as e:
            if self.args.parallel_mode != ParallelMode.DISTRIBUTED or not is_collective_failure(e):
                raise
            raise dead_rank_error(
                e, self.args.process_index, self.args.output_dir, self.args.ddp_timeout
            ) from e

    def _load_finished_run(self, checkpoint: str, state: TrainerState) -> TrainOutput:
        """Load a checkpoint written at the last step (a run killed during its final export) without training.

        transformers resumes such a mid-epoch final checkpoint with one more optimizer step than the run had,
        which would make the resumed model differ from the uninterrupted one.
        """
        logger.warning(
            "%s is the end of training (step %d of max_steps=%d): loading it, nothing left to train.",
            checkpoint,
            state.global_step,
            self.args.max_steps,
        )
        model = self.accelerator.unwrap_model(self.model)
        if os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)):
            load_sharded_checkpoint(model, checkpoint, strict=True)
        else:
            model.load_state_dict(load_file(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)), strict=True)
        self.state = state
        return TrainOutput(state.global_step, float("nan"), {})

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Replaces the Trainer's push at each checkpoint (``push_to_hub=True``, ``hub_strategy`` other than
        ``"end"``), which would copy the checkpoint's full-state weights into ``output_dir`` and upload them
        with ``training_args.bin`` (a pickle that may hold the Hub token) and, for the ``checkpoint``
        strategies, the optimizer state.

        This is the one method through which the Trainer pushes during training, so replacing it is the only
        way to stop that upload without changing the user's arguments. Instead, rank 0 writes the packed
        export of the current weights, a model card and the metrics (``log_history.json``, any
        ``*results.json``) into a temporary folder and uploads it on a background thread with
        `hf_lts.hub.push_export`; a failed upload is logged and training goes on. A push still running
        makes the next one wait for the following save, unless ``hub_always_push``.
        """
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if self._checkpoint_push is not None and not self._checkpoint_push.done():
            if not self.args.hub_always_push:
                logger.info(
                    "Previous push still running: skipping the push of step %d.", self.state.global_step
                )
                return
        model = self.accelerator.unwrap_model(self.model)
        step = self.state.global_step

        def stage(folder: Path) -> None:
            model.save_pretrained(folder)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            (folder / "log_history.json").write_text(json.dumps(self.state.log_history, indent=1))
            copy_metrics_files(self.args.output_dir, folder)

        def upload(folder: Path) -> Any:
            return push_export(
                folder,
                self.hub_model_id,
                token=self.args.hub_token,
                revision=self.args.hub_revision,
                commit_message=f"Training in progress, step {step}",
            )

        self._checkpoint_push = background_push(stage, upload, self.args.output_dir)

    # -- saving ------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the full training state; every other save is the final export (`export_model`).

        The Trainer saves checkpoints as ``save_model(checkpoint_dir, _internal_call=True)``; a user's
        ``save_model()`` and ``push_to_hub`` (``save_model(_internal_call=True)``, no folder) are final saves.
        """
        if _internal_call and output_dir is not None:
            if self.args.should_save:
                unmark_checkpoint(output_dir)  # rewritten from here on: partial until on_save marks it again
            with training_state(self.accelerator.unwrap_model(self.model)):
                super().save_model(output_dir, _internal_call=True)
        else:
            self.export_model(output_dir, _internal_call=_internal_call)

    def export_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the trained model for `from_pretrained`: the single place that decides the final format.

        ``save_pretrained`` of a prepared model writes the packed integer export (`hf_lts.export.packed`); the
        model card (with the last evaluation and the frozen-ratio plot) goes with it, whichever entry point
        saved. A ``model.onnx`` already in the folder (`hf_lts.export_onnx`) is exported again from the same
        model with its input shape and opset, so that it never lags behind the packed weights beside it
        (``push_to_hub`` uploads both).
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        directory = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:  # safetensors writes 0600 files; a Hub mirror or a shared folder reads them
            for weights in Path(directory).glob("*.safetensors"):
                os.chmod(weights, 0o644)
        onnx_file = Path(directory) / ONNX_FILE
        if self.is_world_process_zero() and onnx_file.exists():
            refresh_onnx(self.accelerator.unwrap_model(self.model), onnx_file)
        self._write_card(directory)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write ``README.md`` and its frozen-ratio plot into ``output_dir`` (`hf_lts.card.write_model_card`):
        bits, freezing schedule, savings, per-layer table, the last evaluation, how to load it.

        Same signature as `Trainer.create_model_card` (``push_to_hub`` calls it); ``language``, ``tasks``,
        ``dataset_tags`` and ``dataset_args`` are accepted for compatibility and not used. `save_model`
        writes a card without these details by itself.
        """
        self._write_card(
            self.args.output_dir,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            dataset=dataset,
        )

    def _write_card(
        self,
        directory: str,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
    ) -> None:
        if not self.is_world_process_zero():
            return
        evals = [e for e in self.state.log_history if "eval_loss" in e or "eval_accuracy" in e]
        model_config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        write_model_card(
            directory,
            self.lts_config,
            self.scratcher.stats(),
            model_name=model_name or os.path.basename(os.path.normpath(directory)),
            repo_id=self.hub_model_id,
            base_model=finetuned_from or getattr(model_config, "name_or_path", None),
            datasets=[dataset] if isinstance(dataset, str) else dataset,
            eval_results=evals[-1] if evals else None,
            history=[
                (e["step"], e["lts/frozen_ratio"]) for e in self.state.log_history if "lts/frozen_ratio" in e
            ],
            tags=[tags] if isinstance(tags, str) else tags or (),
            license=license,
        )

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """The Trainer's (creates the Hub repo), with Hub and network failures raised as `HubUploadError`."""
        with upload_errors(self.args.output_dir, self.args.hub_model_id or "the Hub"):
            super().init_hf_repo(token=token, private=private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Export the packed model and its card into ``output_dir``, then upload them with
        `hf_lts.hub.push_export`, which checks that the folder holds the packed export and never uploads
        checkpoints or ``training_args.bin`` (a pickle that may hold the Hub token).

        Same signature as `Trainer.push_to_hub`; ``kwargs`` go to `create_model_card`. Raises
        `hf_lts.hub.HubUploadError` when the upload fails; the local export stays as written.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        self.export_model(_internal_call=True)  # every rank (sharded saves gather), no push of its own
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:  # after the export: a failure here leaves it complete, to push later
            self.init_hf_repo(token=token, private=private)
        kwargs.setdefault("model_name", self.hub_model_id.split("/")[-1])
        self.create_model_card(**kwargs)
        if self._checkpoint_push is not None:  # a checkpoint push still running would race with this one
            self._checkpoint_push.exception()  # wait; its errors were logged already
        return push_export(
            self.args.output_dir,
            self.hub_model_id,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message,
            run_as_future=not blocking,
        )
