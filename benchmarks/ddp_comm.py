"""Gradient all-reduce traffic per step under DDP: plain QAT against LTS, 2 real processes over gloo.

    python -m benchmarks.ddp_comm --output benchmarks/results/ddp_comm.json

Each run is ``torchrun --nproc_per_node 2`` of `LTSTrainer` on a ResNet-18-width model (synthetic data,
32×32): once with ``freeze=False`` and once with LTS. The frozen-aware communication hook
(`hf_lts.distributed`) counts, at every step, the bytes it all-reduced and the bytes DDP's default hook
would have sent; the table shows them at points of the run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import free_port, resnet18

POINTS = (0.25, 0.5, 0.75, 0.9, 1.0)


def worker(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments

    class Traffic(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.last = (0, 0)

        def on_step_end(self, a, state, control, **kwargs):
            s = trainer.allreduce_state
            sent, default = s.bytes_sent - self.last[0], s.bytes_default - self.last[1]
            self.last = (s.bytes_sent, s.bytes_default)
            frozen = trainer.scratcher.stats()["frozen_ratio"]
            self.rows.append({"step": state.global_step, "sent": sent, "default": default, "frozen": frozen})

    torch.manual_seed(0)
    model = resnet18(num_labels=10)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch * 2
    data = Dataset.from_dict(
        {
            "pixel_values": torch.randn(n, 3, 32, 32, generator=g).numpy(),
            "labels": torch.randint(0, 10, (n,)).numpy(),
        }
    ).with_format("torch")
    training = LTSTrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=0.02,
        optim="sgd", optim_args="momentum=0.9", save_strategy="no", report_to="none", use_cpu=True,
        logging_steps=args.steps, dataloader_pin_memory=False, seed=0, disable_tqdm=True,
    )  # fmt: skip
    lts = LTSConfig(weight_bits=4, activation_bits=4, freeze=args.method == "lts", distance_momentum=0.9)
    traffic = Traffic()
    trainer = LTSTrainer(model=model, args=training, lts_config=lts, train_dataset=data, callbacks=[traffic])
    trainer.train()
    if trainer.args.process_index == 0:
        Path(args.out, "traffic.json").write_text(json.dumps(traffic.rows))


def launch(method: str, steps: int, batch: int, out: Path) -> list[dict]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += ["--master_port", port, "-m", "benchmarks.ddp_comm", "--worker", "--method", method]
    cmd += ["--steps", str(steps), "--batch", str(batch), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL)
    return json.loads((out / "traffic.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lts", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {m: launch(m, args.steps, args.batch, Path(tmp, m)) for m in ("qat", "lts")}
    lines = [
        "| progress | step | QAT MB/step | LTS MB/step | LTS / QAT | LTS frozen ratio |",
        "|---|---|---|---|---|---|",
    ]
    for p in POINTS:
        i = max(0, round(p * args.steps) - 1)
        q, t = runs["qat"][i], runs["lts"][i]
        ratio = t["sent"] / q["sent"]
        lines.append(
            f"| {p:.0%} | {t['step']} | {q['sent'] / 1e6:.2f} | {t['sent'] / 1e6:.2f} | {ratio:.3f} | {t['frozen']:.1%} |"
        )
    total = sum(r["sent"] for r in runs["lts"]) / sum(r["sent"] for r in runs["qat"])
    lines.append(f"\nWhole run: LTS sent {total:.3f} of QAT's all-reduce bytes.")
    print("\n".join(lines))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"steps": args.steps, "batch": args.batch, **runs}, indent=1))


if __name__ == "__main__":
    main()
