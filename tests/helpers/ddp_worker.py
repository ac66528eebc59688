"""One process of the multi-process tests: `LTSTrainer` on a small model, launched by torchrun / accelerate.

``train``: N optimizer steps (checkpoint every ``--save-steps``), optionally resumed from a checkpoint
(``--resume last``: the newest complete one), then the final export (``save_model``); every rank writes a
digest of its model state (BatchNorm running statistics excluded: they are per rank under DDP) and its LTS
statistics. ``--kill-at WHERE:STEP`` makes rank ``--kill-rank`` SIGKILL itself: ``step`` after the backward
of step STEP, before its optimizer step; ``save`` while writing ``checkpoint-STEP`` (its weights file half
written); ``export`` while writing the final export (likewise). Every ``train`` run keeps its trainer alive
to the end, as a script written at module level does, and writes, from the last ``atexit`` handler, the
names of the threads its process still has (``threads{rank}.json``). ``grad``: one step of a BatchNorm-free model; rank 0 writes the
all-reduced gradient, to compare a 2-process run with a 1-process run of the same global batch.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
import transformers.modeling_utils
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutput

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers.tiny_models import tiny_resnet  # noqa: E402
from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments  # noqa: E402


class NoNormNet(nn.Module):
    """Conv → ReLU → conv → ReLU → pool → linear, no BatchNorm: the gradient of a global batch must not
    depend on how it is split across processes. Takes ``**kwargs`` like transformers' vision models, which
    is what sets off the Trainer's loss-scaling trap."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
        )  # fmt: skip

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        logits = self.body(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def dataset(n: int, size: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if "running_" in key or "num_batches_tracked" in key:
            continue
        h.update(key.encode())
        h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class GradCapture(TrainerCallback):
    """Keeps the (all-reduced) gradients seen just before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {
                n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
            }


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillMidStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            die()


def kill_while_writing(where: str, step: int) -> None:
    """SIGKILL this process in the middle of writing a weights file: a checkpoint's or the final export's."""
    real_save = transformers.modeling_utils.safe_save_file

    def torn_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        in_checkpoint = f"checkpoint-{step}" in str(filename)
        if (where == "save" and in_checkpoint) or (where == "export" and "checkpoint-" not in str(filename)):
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            die()

    transformers.modeling_utils.safe_save_file = torn_save


KEPT: list[LTSTrainer] = []  # the trainer, held by a global until the interpreter's teardown


def record_threads_at_exit(out: str) -> None:
    """Registered before the trainer (atexit runs handlers last-in first-out), so this runs after hf-lts's
    exit handler: what is left for the interpreter's teardown."""
    rank = os.environ.get("RANK", "0")

    def record() -> None:
        task = f"/proc/{os.getpid()}/task"
        names = [Path(task, t, "comm").read_text().strip() for t in os.listdir(task)]
        Path(out, f"threads{rank}.json").write_text(json.dumps(names))

    atexit.register(record)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "grad"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="per-process batch size")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--default-allreduce", action="store_true", help="DDP's own all-reduce hook")
    parser.add_argument("--kill-at", default=None, help="step:N, save:N or export:N")
    parser.add_argument("--kill-rank", type=int, default=0)
    parser.add_argument("--ddp-timeout", type=int, default=1800)
    a = parser.parse_args()
    callbacks = []
    if a.kill_at and int(os.environ.get("RANK", "0")) == a.kill_rank:
        where, step = a.kill_at.split(":")
        if where == "step":
            callbacks.append(KillMidStep(int(step)))
        else:
            kill_while_writing(where, int(step))

    if a.mode == "train":
        record_threads_at_exit(a.out)
    model = NoNormNet() if a.mode == "grad" else tiny_resnet()
    args = LTSTrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=1e-4,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
        skip_frozen_allreduce=not a.default_allreduce,
        ddp_timeout=a.ddp_timeout,
    )
    config = LTSConfig(weight_bits=2, activation_bits=4, distance_momentum=0.5, freeze_warmup_ratio=0.1)
    capture = GradCapture()
    trainer = LTSTrainer(
        model=model, args=args, lts_config=config, train_dataset=dataset(64), callbacks=[capture, *callbacks]
    )
    KEPT.append(trainer)
    trainer.train(resume_from_checkpoint=a.resume)
    rank = trainer.args.process_index
    if a.mode == "grad":
        if rank == 0:
            torch.save(capture.grads, os.path.join(a.out, "grads.pt"))
        return
    trainer.save_model()
    quantizers = {
        n: [m.input_quantizer.scale.item(), bool(m.input_quantizer.signed)]
        for n, m in model.named_modules()
        if hasattr(m, "input_quantizer")
    }
    result = {
        "world_size": trainer.args.world_size,
        "digest": state_digest(model),
        "stats": {k: v for k, v in trainer.scratcher.stats().items() if k != "per_layer"},
        "activation_quantizers": quantizers,
        "log_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "allreduce_bytes_saved": [e.get("lts/allreduce_bytes_saved") for e in trainer.state.log_history],
    }
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
