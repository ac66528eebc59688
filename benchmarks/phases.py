"""Where in a run LTS gains or loses against QAT: both trained step by step in one process.

    python -m benchmarks.phases --model small-resnet18 --image-size 28 --batch-size 64 --steps 600

A QAT model and an LTS model (same initialisation, W4A4, SGD with momentum and a cosine schedule, the
accuracy benchmark's fine-tuning settings) take their optimizer steps alternately on the same batches, so
that the host's drift hits both alike. Every step's wall time (forward, backward, optimizer, scratcher) is
recorded with the LTS model's frozen share, the share of its weight-gradient work skipped, and how many
layers are fully frozen or on the stragglers-only path; the table sums them over twelve phases of the run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.quantization import quantized_layers

from .common import build_model, training_images


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small-resnet18", help="a benchmarks.speed model name")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--phases", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--lts-option", action="append", default=[], help="LTSConfig KEY=VALUE for the LTS model"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = {}
    for item in args.lts_option:
        key, value = item.split("=", 1)
        options[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value

    x, y, _ = training_images(args.steps * args.batch_size, args.image_size)
    runs = {}
    for name in ("qat", "lts"):
        torch.manual_seed(0)
        config = LTSConfig(
            weight_bits=4, activation_bits=4, freeze=name == "lts", **(options if name == "lts" else {})
        )
        model = prepare_model(build_model(args.model, args.image_size), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
        cosine = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / args.steps))
        )
        scratcher = LotteryTicketScratcher(model, config, total_steps=args.steps)
        runs[name] = (model, optimizer, cosine, scratcher)
    layers = quantized_layers(runs["lts"][0])
    weights = sum(layer.weight.numel() for layer in layers.values())

    steps = []
    for t in range(args.steps):
        batch = slice(t * args.batch_size, (t + 1) * args.batch_size)
        record: dict[str, Any] = {}
        for name, (model, optimizer, cosine, scratcher) in runs.items():
            start = time.perf_counter()
            F.cross_entropy(model(pixel_values=x[batch]).logits, y[batch]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cosine.step()
            scratcher.step()
            record[name] = time.perf_counter() - start
        record["frozen"] = sum(layer.num_frozen for layer in layers.values()) / weights
        skipped = sum(layer.skipped_weight_grad_ratio * layer.weight.numel() for layer in layers.values())
        record["skipped"] = skipped / weights
        record["full_layers"] = sum(layer.num_frozen == layer.weight.numel() for layer in layers.values())
        record["straggler_layers"] = sum(layer._stragglers for layer in layers.values())
        steps.append(record)

    size = math.ceil(args.steps / args.phases)
    print(
        f"\n| steps | LTS × QAT | frozen | weight-grad work skipped | layers fully frozen / stragglers only (of {len(layers)}) |"
    )
    print("|---|---:|---:|---:|---:|")
    for first in range(0, args.steps, size):
        phase = steps[first : first + size]
        ratio = sum(r["lts"] for r in phase) / sum(r["qat"] for r in phase)
        last = phase[-1]
        print(
            f"| {first}–{first + len(phase)} | {ratio:.3f} | {last['frozen']:.1%} | {last['skipped']:.1%} "
            f"| {last['full_layers']} / {last['straggler_layers']} |"
        )
    total = sum(r["lts"] for r in steps) / sum(r["qat"] for r in steps)
    print(f"| all | **{total:.3f}** | | | |")
    if args.output:
        args.output.write_text(
            json.dumps({"settings": vars(args) | {"output": str(args.output)}, "steps": steps}) + "\n"
        )
    return steps


if __name__ == "__main__":
    main()
