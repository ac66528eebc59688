"""Step time, peak memory, LTS state size and backward FLOPs of fp32, plain QAT and LTS training.

    python -m benchmarks.speed --output benchmarks/results/speed.json

A step is forward + backward + optimizer step + scratcher step on one fixed batch. Every variant lives in
the same process and the variants are timed round-robin (interleaved), so load from other processes on a
shared machine hits them alike; the table reports medians and ratios within the run. Peak memory is
measured in fresh subprocesses per variant (the rise of the peak RSS over a few steps above a baseline
read after the set-up's freed memory is handed back; the median of ``--memory-repeats`` processes).

LTS variants freeze 0–100 % of the quantized weights, with masks either taken from a real LTS run (the
model trained briefly on Fashion-MNIST or, without it, scikit-learn's digits; the mask is snapshotted at
the step where the frozen ratio first crosses the target, and completed by the smallest final distances
if the short run never gets there) or drawn uniformly at random (`QuantLayerMixin.freeze_`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.quantization import quantized_layers, state

from .common import NUM_LABELS, build_model, markdown_table, training_images

TARGETS = (0.5, 0.7, 0.9)


def variant_names(quick: bool) -> list[str]:
    targets = TARGETS[1:2] if quick else TARGETS
    real = [f"lts-real-{round(100 * t)}" for t in targets]
    random = [f"lts-random-{round(100 * t)}" for t in targets]
    return ["fp32", "qat", "lts-0", *real, *random, "lts-all-100"]


def frozen_target(variant: str) -> float:
    return int(variant.rsplit("-", 1)[1]) / 100 if variant.startswith("lts-") else 0.0


# -- the real LTS run -----------------------------------------------------------------------------------
def real_masks(
    model_name: str, image_size: int, batch_size: int, steps: int, lts: LTSConfig
) -> tuple[dict[float, dict[str, torch.Tensor]], dict[str, Any]]:
    """Frozen masks of a short real LTS run, at the step where the frozen ratio crosses each target."""
    x, y, data_name = training_images(steps * batch_size, image_size)
    model = prepare_model(build_model(model_name, image_size), lts)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    scratcher = LotteryTicketScratcher(model, total_steps=steps)
    layers = quantized_layers(model)
    masks: dict[float, dict[str, torch.Tensor]] = {}
    crossed: dict[float, int] = {}
    losses = []
    for t in range(steps):
        batch = slice(t * batch_size, (t + 1) * batch_size)
        loss = F.cross_entropy(model(pixel_values=x[batch]).logits, y[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scratcher.step()
        losses.append(loss.item())
        ratio = scratcher.stats()["frozen_ratio"]
        for target in TARGETS:
            if target not in masks and ratio >= target:
                masks[target] = {n: layer.frozen_mask for n, layer in layers.items()}
                crossed[target] = t + 1
    final_ratio = scratcher.stats()["frozen_ratio"]
    for target in TARGETS:
        if target not in masks:  # complete with the trainable weights closest to their level
            masks[target] = _complete_by_distance(layers, target)
    info = {
        "data": data_name,
        "steps": steps,
        "final_frozen_ratio": final_ratio,
        "crossed_at_step": {str(t): crossed.get(t) for t in TARGETS},
        "first_loss": losses[0],
        "last_loss": statistics.mean(losses[-5:]),
        "config": {k: v for k, v in lts.to_dict().items() if not k.endswith("_version")},
    }
    return masks, info


def _complete_by_distance(layers: dict[str, nn.Module], target: float) -> dict[str, torch.Tensor]:
    frozen = {n: layer.frozen_mask for n, layer in layers.items()}
    distance = {
        n: state.distance(layer.lts_state).masked_fill(frozen[n], -1.0) for n, layer in layers.items()
    }
    flat = torch.cat([d.flatten() for d in distance.values()])
    count = math.ceil(target * flat.numel())
    threshold = flat.kthvalue(count).values
    return {n: distance[n] <= threshold for n in layers}


# -- one variant --------------------------------------------------------------------------------------
class Variant:
    """A model, optimizer and scratcher set up for one variant, with a fixed batch."""

    def __init__(self, name: str, model_name: str, image_size: int, batch_size: int, masks: Any) -> None:
        self.name = name
        self.model = build_model(model_name, image_size)
        self.scratcher = None
        if name != "fp32":
            # Warm-up covers the whole benchmark: the scratcher does its full work but freezes nothing new.
            config = LTSConfig(freeze=name != "qat", freeze_warmup_ratio=0.5)
            prepare_model(self.model, config)
            self.scratcher = LotteryTicketScratcher(self.model, total_steps=1_000_000)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        self.y = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        if name.startswith("lts-") and name != "lts-0":
            target = frozen_target(name)
            layers = quantized_layers(self.model)
            generator = torch.Generator().manual_seed(2)
            for n, layer in layers.items():
                if name == "lts-all-100":
                    mask = torch.ones_like(layer.weight, dtype=torch.bool)
                elif name.startswith("lts-random"):
                    mask = torch.rand(layer.weight.shape, generator=generator) < target
                else:
                    mask = masks[target][n]
                layer.freeze_(mask)

    def step(self) -> None:
        loss = F.cross_entropy(self.model(pixel_values=self.x).logits, self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scratcher is not None:
            self.scratcher.step()

    def backward_flops(self) -> int:
        loss = F.cross_entropy(self.model(pixel_values=self.x).logits, self.y)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def counted_saving(self) -> float:
        """LTS.md §5's backward-FLOPs saving for the current masks (one step)."""
        if self.scratcher is None:
            return 0.0
        layers = quantized_layers(self.model).values()
        macs = sum(int(layer.lts_macs) for layer in layers)
        saved = sum(layer.num_frozen / layer.weight.numel() * int(layer.lts_macs) for layer in layers)
        return saved / (2 * macs)

    def extras(self) -> dict[str, Any]:
        if self.scratcher is None:
            return {"frozen_ratio": 0.0, "state_bytes_per_weight": 0.0}
        stats = self.scratcher.stats()
        return {k: stats[k] for k in ("frozen_ratio", "state_bytes_per_weight", "quantized_weights")}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _release_free_memory() -> None:
    """Hand memory that setting up freed back to the OS (glibc's ``malloc_trim``), so that the baseline is
    what the process holds, not what its allocator happens to keep: without it the baseline moved by
    ± 8 MB between runs, as much as a small model's whole training rise."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline keeps the allocator's free memory
        pass


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: peak-RSS rise over a few steps of one variant, printed as JSON."""
    torch.set_num_threads(args.threads)
    masks = torch.load(args.masks) if args.masks else None
    variant = Variant(args.memory_child, args.model, args.image_size, args.batch_size, masks)
    _release_free_memory()
    before = _status_mb("VmRSS")
    try:  # reset the peak RSS to the current RSS (Linux ≥ 4.0), so the peak is that of training
        Path("/proc/self/clear_refs").write_text("5")
        peak_of = lambda: _status_mb("VmHWM")  # noqa: E731
    except OSError:
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    for _ in range(3):
        variant.step()
    peak = peak_of()
    print(json.dumps({"peak_rss_mb": peak, "training_mb": peak - before}))


def measure_memory(args: argparse.Namespace, model: str, names: list[str], masks_path: str) -> dict[str, Any]:
    """Peak RSS per variant, each in its own subprocess (two at a time), ``--memory-repeats`` times: the
    median rise is reported, with every run's."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    pending = [name for _ in range(args.memory_repeats) for name in names]
    while pending:
        batch, pending = pending[:2], pending[2:]
        command = [sys.executable, "-m", "benchmarks.speed", "--model", model, "--masks", masks_path]
        command += ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
        command += ["--threads", str(args.threads)]
        procs = [
            (name, subprocess.Popen([*command, "--memory-child", name], stdout=subprocess.PIPE, text=True))
            for name in batch
        ]
        for name, proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory measurement of {model}/{name} failed")
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    results: dict[str, Any] = {}
    for name, records in runs.items():
        rises = [r["training_mb"] for r in records]
        results[name] = {
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in records),
            "training_mb": statistics.median(rises),
            "training_mb_all": rises,
        }
    return results


def run_model(args: argparse.Namespace, model: str) -> dict[str, Any]:
    names = args.variants or variant_names(args.quick)
    lts = LTSConfig(distance_momentum=0.9, freeze_warmup_ratio=0.2, **dict(args.mask_option))
    t0 = time.perf_counter()
    masks, run_info = real_masks(model, args.image_size, args.batch_size, args.mask_steps, lts)
    run_info["seconds"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        masks_path = str(Path(tmp) / "masks.pt")
        torch.save(masks, masks_path)
        measured = [n for n in names if args.memory_variants is None or n in args.memory_variants]
        memory = measure_memory(args, model, measured, masks_path) if args.memory else {}
    t0 = time.perf_counter()
    variants = {name: Variant(name, model, args.image_size, args.batch_size, masks) for name in names}
    setup_s = time.perf_counter() - t0  # includes compiling the scratcher's update on first use
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + args.repeats):
        for name, variant in variants.items():
            start = time.perf_counter()
            variant.step()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    rows = {}
    for name, variant in variants.items():
        rows[name] = {
            "step_ms": 1000 * statistics.median(times[name]),
            "step_ms_all": [1000 * t for t in times[name]],
            "backward_flops": variant.backward_flops(),
            "backward_flops_saved_counted": variant.counted_saving(),
            **variant.extras(),
            **memory.get(name, {}),
        }
    for row in rows.values():
        for base in ("fp32", "qat"):
            if base in rows:
                row[f"step_vs_{base}"] = row["step_ms"] / rows[base]["step_ms"]
        if "qat" in rows:
            row["backward_flops_saved_measured"] = 1 - row["backward_flops"] / rows["qat"]["backward_flops"]
            if "training_mb" in row and "training_mb" in rows["qat"]:
                row["training_memory_vs_qat"] = row["training_mb"] / rows["qat"]["training_mb"]
    return {"mask_run": run_info, "setup_seconds": setup_s, "variants": rows}


def markdown(results: dict[str, Any]) -> str:
    header = ["model", "variant", "frozen", "step ms", "× fp32", "× QAT", "peak RSS MB", "training MB", "× QAT",
              "bwd GFLOP", "bwd saved, measured", "bwd saved, counted"]  # fmt: skip
    nan = float("nan")
    rows = [
        [
            model,
            name,
            f"{r['frozen_ratio']:.0%}",
            f"{r['step_ms']:.1f}",
            f"{r.get('step_vs_fp32', nan):.2f}",
            f"{r.get('step_vs_qat', nan):.2f}",
            f"{r.get('peak_rss_mb', nan):.0f}",
            f"{r.get('training_mb', nan):.0f}",
            f"{r.get('training_memory_vs_qat', nan):.2f}",
            f"{r['backward_flops'] / 1e9:.2f}",
            f"{r.get('backward_flops_saved_measured', nan):.1%}",
            f"{r['backward_flops_saved_counted']:.1%}",
        ]  # fmt: skip
        for model, result in results["models"].items()
        for name, r in result["variants"].items()
    ]
    return "\n".join(markdown_table(header, rows, "llrrrrrrrrrr"))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="resnet18, mobilenetv2, small-resnet18, small-mobilenet_v2, small-vit (patch 4, 28 px), tiny",
    )
    parser.add_argument("--variants", nargs="+", default=None, help="default: all (see variant_names)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed round-robin steps first")
    parser.add_argument("--mask-steps", type=int, default=None, help="steps of the real LTS run")
    parser.add_argument(
        "--mask-option",
        action="append",
        default=[],
        type=lambda kv: (kv.split("=", 1)[0], yaml.safe_load(kv.split("=", 1)[1])),
        help="LTSConfig KEY=VALUE for the real run that makes the lts-real-* masks (e.g. channel_completion=0.9)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-RSS subprocesses")
    parser.add_argument("--memory-variants", nargs="+", default=None, help="peak RSS of these only")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="fresh processes per variant for peak RSS; median kept"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--masks", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (16 if args.quick else 64)
    args.batch_size = args.batch_size or (4 if args.quick else 32)
    if args.memory_child:
        memory_child(args)
        return None
    args.models = args.models or (["tiny"] if args.quick else ["resnet18", "mobilenetv2"])
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.mask_steps = args.mask_steps or (12 if args.quick else 150)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("output", "memory_child", "model", "masks")
        },
        "models": {},
    }
    for model in args.models:
        results["models"][model] = run_model(args, model)
    print(markdown(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
