"""Dense against stragglers-only weight gradients, layer by layer.

    python -m benchmarks.stragglers --model resnet18 --output benchmarks/results/stragglers_resnet18.json

For every quantized layer of a benchmark model: the median time of its forward and backward (on the input
shape the model gives it) with a share of its weights still trainable (drawn at random), once with the
dense weight gradient (`QuantLayerMixin.max_straggler_share = 0`) and once letting the layer choose
(`max_straggler_share = 1`: its cost model alone decides whether the trainable weights' gradients are
computed one dot product each). The totals over the layers are the per-step difference the straggler path
makes at that share. Layers marked ``*`` took the straggler path.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hf_lts import LTSConfig, prepare_model
from hf_lts.quantization import quantized_layers

from .common import build_model


def _median_ms(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        xg = x.detach().requires_grad_()
        start = time.perf_counter()
        out = layer(xg)
        out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", help="a benchmarks.speed model name")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.002, 0.01, 0.03, 0.1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = prepare_model(build_model(args.model, args.image_size), LTSConfig())
    layers = quantized_layers(model)
    inputs: dict[str, torch.Size] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0].shape) and None)
        for name, layer in layers.items()
    ]
    model(pixel_values=torch.randn(args.batch_size, 3, args.image_size, args.image_size))
    for hook in hooks:
        hook.remove()

    rows = []
    for name, layer in layers.items():
        x = torch.randn(inputs[name]).relu()
        row = {"layer": name, "weight": list(layer.weight.shape), "input": list(inputs[name]), "shares": {}}
        for share in args.shares:
            trial = copy.deepcopy(layer)
            draw = torch.rand(trial.weight.shape, generator=torch.Generator().manual_seed(0))
            trial.freeze_(draw >= share)
            trial.max_straggler_share = 0.0
            dense = _median_ms(trial, x, args.repeats)
            trial.max_straggler_share = 1.0
            chosen = _median_ms(trial, x, args.repeats)
            row["shares"][str(share)] = {
                "dense_ms": dense,
                "chosen_ms": chosen,
                "stragglers": trial._stragglers,
            }
        rows.append(row)
        cells = " | ".join(
            f"{s}: {r['dense_ms']:.2f}/{r['chosen_ms']:.2f}{'*' if r['stragglers'] else ''}"
            for s, r in row["shares"].items()
        )
        print(f"{name} {tuple(layer.weight.shape)} {cells}", flush=True)
    totals = {
        str(share): {
            "dense_ms": sum(r["shares"][str(share)]["dense_ms"] for r in rows),
            "chosen_ms": sum(r["shares"][str(share)]["chosen_ms"] for r in rows),
        }
        for share in args.shares
    }
    print("\n| trainable share | dense ms | chosen ms | × dense |\n|---:|---:|---:|---:|")
    for share, total in totals.items():
        ratio = total["chosen_ms"] / total["dense_ms"]
        print(f"| {float(share):.1%} | {total['dense_ms']:.1f} | {total['chosen_ms']:.1f} | {ratio:.2f} |")
    results = {"settings": vars(args) | {"output": str(args.output)}, "layers": rows, "totals": totals}
    if args.output:
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
