"""Whole-run wall time of LTS against plain QAT: the same `LTSTrainer` run, back to back.

    python -m benchmarks.timing                                  # every model, the default variants
    python -m benchmarks.timing --models small-resnet18 --steps 150 --variants qat lts   # a quick look
    python -m benchmarks.timing --cold                           # each run compiles from scratch

Each run is a fresh process (`--child`) that builds the model, trains it for ``--steps`` optimizer steps
on Fashion-MNIST (scikit-learn's digits where Fashion-MNIST is not installed) through `LTSTrainer` with the
accuracy benchmark's fine-tuning hyperparameters, and reports the wall time of ``trainer.train()`` —
compilation included — with the LTS statistics. ``qat`` is ``LTSConfig(freeze=False)``; ``lts`` is the
paper's default (linear schedule, warm-up 0.2, momentum 0.99); other variants add `LTSConfig` options.
The runs follow each other on an otherwise idle machine and the table gives each one's ratio to QAT's;
``--rounds 2`` runs the whole sequence twice and keeps each variant's best time. Every record carries each
optimizer step's wall time; the table sums them by quarter of the run against QAT's (where the cascade of
freezing pays off). ``--paired`` runs each variant at the same time as its own QAT run, one thread each, so
that a host whose speed drifts (a shared or virtual machine) slows both alike; the ratio is then within
the pair.
With ``--cold`` every run gets empty build caches (the native CPU kernels and `torch.compile`'s: what a
first run on a new machine pays); without them, the first run fills the on-disk caches and the others
reuse them, as a user's later runs do.

Models: ``small-resnet18`` and ``small-mobilenet_v2`` are the accuracy benchmark's (28 px, batch 64);
``resnet18`` is ResNet-18 at full width, 64 px, batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODELS = {  # name → (image size, batch size)
    "small-resnet18": (28, 64),
    "small-mobilenet_v2": (28, 64),
    "resnet18": (64, 32),
}
VARIANTS = {
    "qat": {"freeze": False},
    "lts": {},
    "lts-completion": {"channel_completion": 0.9},
    "lts-completion-observed": {"channel_completion": 0.9, "distance_init": "observed"},
    "lts-completion75": {"channel_completion": 0.75},
    "lts-completion60": {"channel_completion": 0.6},
    "lts-completion50": {"channel_completion": 0.5},
    "lts-completion60-observed": {"channel_completion": 0.6, "distance_init": "observed"},
    "lts-completion60-sine": {"channel_completion": 0.6, "freeze_schedule": "sine"},
    "lts-completion50-observed": {"channel_completion": 0.5, "distance_init": "observed"},
    "lts-completion75-observed-sine": {
        "channel_completion": 0.75,
        "distance_init": "observed",
        "freeze_schedule": "sine",
    },
}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process; returns its record (with every optimizer step's wall time)."""
    from transformers import PrinterCallback, TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: where in a run LTS gains or loses."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    from benchmarks.common import BUDGETS, build_model, small_model, training_args
    from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments
    from hf_lts.data import FASHION_MNIST_DIR, label_maps, load_image_dataset, prepare_dataset

    torch.set_num_threads(args.threads)
    image_size, batch_size = MODELS[args.model]
    fashion = (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").exists()
    data = load_image_dataset("fashion_mnist", data_dir=FASHION_MNIST_DIR) if fashion else None
    if data is None:
        data = load_image_dataset("digits")
    train = data["train"].select(range(min(len(data["train"]), args.steps * batch_size)))
    train = prepare_dataset(train, image_size, train=True)
    num_labels = len(label_maps(data)[0])
    torch.manual_seed(args.seed)
    if args.model.startswith("small-"):
        model = small_model(args.model.removeprefix("small-"), num_labels, image_size)
    else:
        model = build_model(args.model, image_size, num_labels)
    budget = BUDGETS["full"]
    with tempfile.TemporaryDirectory() as tmp:
        run_args = training_args(LTSTrainingArguments, tmp, budget, args.seed, quantized=True)
        run_args.max_steps = args.steps
        run_args.per_device_train_batch_size = batch_size
        run_args.logging_steps = max(1, args.steps // 10)
        options = {"weight_bits": args.bits, "activation_bits": args.bits, **VARIANTS[args.variant]}
        trainer = LTSTrainer(
            model=model.train(), args=run_args, lts_config=LTSConfig(**options), train_dataset=train
        )
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer()
        trainer.add_callback(timer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    stats = trainer.scratcher.stats()
    return {
        "model": args.model,
        "variant": args.variant,
        "options": options,
        "steps": args.steps,
        "data": "fashion_mnist" if fashion else "digits",
        "wall_seconds": seconds,
        "train_loss": next(e["train_loss"] for e in trainer.state.log_history if "train_loss" in e),
        **{k: stats[k] for k in ("frozen_ratio", "weight_updates_saved", "backward_flops_saved")},
        "backward_flops_saved_realised": stats["backward_flops_saved_realised"],
        "step_seconds": timer.seconds,
    }


def _start(args: argparse.Namespace, model: str, variant: str, cache: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    if cache is not None:  # nothing built: neither the native kernels nor compiled ones
        env["TORCHINDUCTOR_CACHE_DIR"] = f"{cache}/inductor"
        env["TORCH_EXTENSIONS_DIR"] = f"{cache}/extensions"
    command = [sys.executable, "-m", "benchmarks.timing", "--child", "--model", model, "--variant", variant]
    command += ["--steps", str(args.steps), "--bits", str(args.bits), "--threads", str(args.threads)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict[str, Any]:
    out, _ = process.communicate()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    return json.loads(out.strip().splitlines()[-1])


def run(args: argparse.Namespace, model: str, variant: str, cache: str | None) -> dict[str, Any]:
    return _result(_start(args, model, variant, cache))


def run_paired(args: argparse.Namespace, model: str, variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """QAT and ``variant`` at the same time, one thread each: whatever the host does to one, it does to the
    other (on a shared or virtual machine, back-to-back runs drift by more than the effect measured)."""
    processes = [_start(args, model, v, None) for v in ("qat", variant)]
    qat, other = (_result(p) for p in processes)
    other["paired_qat_seconds"] = qat["wall_seconds"]
    return qat, other


def quarters(record: dict[str, Any], qat: dict[str, Any]) -> str:
    """Summed step times against QAT's in each quarter of the run (the cascade shows as a drop)."""
    mine, theirs = record.get("step_seconds"), qat.get("step_seconds")
    if not mine or not theirs or len(mine) != len(theirs):
        return "—"
    size = -(-len(mine) // 4)
    parts = range(0, len(mine), size)
    return " / ".join(f"{sum(mine[i : i + size]) / sum(theirs[i : i + size]):.2f}" for i in parts)


def markdown(records: list[dict[str, Any]]) -> str:
    lines = [
        "| model | variant | wall s | × QAT | steps × QAT by quarter | frozen | updates saved "
        "| bwd saved, counted | bwd saved, realised |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    qat = {r["model"]: r for r in records if r["variant"] == "qat"}
    for r in records:
        base = qat.get(r["model"])
        ratio = r["wall_seconds"] / base["wall_seconds"] if base else float("nan")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['wall_seconds']:.1f} | {ratio:.2f} | "
            f"{quarters(r, base) if base else '—'} | {r['frozen_ratio']:.1%} | "
            f"{r['weight_updates_saved']:.1%} | {r['backward_flops_saved']:.1%} | "
            f"{r['backward_flops_saved_realised']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.timing", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cold", action="store_true", help="empty build caches (native kernels, inductor) for every run"
    )
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this often; best time kept")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="run each variant at the same time as a QAT run, one thread each",
    )
    parser.add_argument("--output", type=Path, help="write the records as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    records = []
    if args.paired:
        args.threads = 1
        for model in args.models:
            warm = argparse.Namespace(**{**vars(args), "steps": 20})
            run(warm, model, "qat", None)  # fills the compile cache: neither run of a pair compiles more
            for variant in [v for v in args.variants if v != "qat"]:
                for record in run_paired(args, model, variant):
                    print(json.dumps(record), flush=True)
                    records.append(record)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            best: dict[str, dict[str, Any]] = {}
            for round_ in range(
                0 if args.paired else args.rounds
            ):  # QAT, LTS, …, QAT, LTS, …: drifts in load hit all alike
                for index, variant in enumerate(args.variants):
                    cache = f"{tmp}/{model}-{index}-{round_}" if args.cold else None
                    record = run(args, model, variant, cache)
                    print(json.dumps(record), flush=True)
                    walls = [*best.get(variant, {}).get("wall_seconds_all", []), record["wall_seconds"]]
                    best[variant] = min(best.get(variant, record), record, key=lambda r: r["wall_seconds"])
                    best[variant]["wall_seconds_all"] = walls
            records += best.values()
    if args.paired:
        lines = markdown([]).splitlines()[:2]
        for qat, other in zip(records[::2], records[1::2], strict=True):
            lines += markdown([qat, other]).splitlines()[2:]
        print("\n".join(lines))
    else:
        print(markdown(records))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "command": "python -m benchmarks.timing " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        }
        args.output.write_text(json.dumps({**meta, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
