"""The `LTSTrainer`'s callbacks: the scratcher's step after each optimizer step, the DDP hook that leaves
fully frozen weights out of the all-reduce, and the completeness marker of each checkpoint."""

from __future__ import annotations

import logging
import os

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distributed import register_frozen_aware_hook
from .resilience import mark_checkpoint_complete
from .scratcher import LotteryTicketScratcher

logger = logging.getLogger(__name__)


class LTSCallback(TrainerCallback):
    """Steps the scratcher once per optimizer step, right after ``optimizer.step()``.

    ``on_optimizer_step`` fires once per optimizer step whatever ``gradient_accumulation_steps`` is, and
    never during evaluation. Under fp16 a step the GradScaler skips (inf/nan gradients) still counts: the
    weights did not move, so the distance update only re-observes them, and keeping the scratcher's
    ``lts_step`` equal to ``state.global_step`` keeps the freezing schedule aligned with the run's ``T``
    (the Trainer counts skipped steps too).
    """

    def __init__(self, scratcher: LotteryTicketScratcher) -> None:
        self.scratcher = scratcher

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.scratcher.total_steps = state.max_steps
        if self.scratcher.step_count != state.global_step:
            logger.warning(
                "The model's LTS step counter is %d but training starts at step %d: the freezing schedule "
                "continues from the model's counter (was the model trained before, or the checkpoint mixed?).",
                self.scratcher.step_count,
                state.global_step,
            )

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.scratcher.step()


class FrozenAllReduceCallback(TrainerCallback):
    """Installs `frozen_aware_allreduce_hook` on the DDP-wrapped model, which exists from ``on_train_begin``
    on (the Trainer wraps the model before it) and before the first backward."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not hasattr(
            wrapped, "_lts_allreduce"
        ):
            wrapped._lts_allreduce = self.trainer.allreduce_state = register_frozen_aware_hook(wrapped)


class CheckpointCompleteCallback(TrainerCallback):
    """Marks ``checkpoint-N/`` complete once every rank has written its part (`hf_lts.resilience`).

    ``on_save`` runs on every rank right after the Trainer's checkpoint save; the barrier makes rank 0 wait
    for the other ranks' files (their RNG states) before it vouches for the folder.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            mark_checkpoint_complete(
                os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), state.global_step
            )
