"""One prepared GPU check: a few LTS steps of ResNet-18 at 224 px, exactness on the device, step times.

    python -m benchmarks.gpu_check                   # on a CUDA machine, well under 5 minutes
    python -m benchmarks.gpu_check --device cpu --image-size 32 --batch 4 --steps 3 --tiny   # smoke run

Synthetic data (nothing is downloaded). It checks on the device what the CPU tests check: frozen weights
keep their latent value and level bit for bit under SGD with momentum and weight decay, their gradient is
zero, a fully frozen layer computes no weight gradient. Then it times median steps (forward + backward +
optimizer + scratcher) of fp32, plain QAT and LTS with 0 % / 70 % (random) / 100 % of the weights frozen,
and prints a JSON line with everything (``--output`` writes it too).
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.quantization import quantized_layers


def resnet18(tiny: bool) -> nn.Module:
    torch.manual_seed(0)
    sizes = dict(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8) if tiny else {}
    config = ResNetConfig(
        layer_type="basic", **{"depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], **sizes}
    )
    return ResNetForImageClassification(config)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def variant(name: str, tiny: bool, device: torch.device, frozen: float):
    model = resnet18(tiny)
    scratcher = None
    if name != "fp32":
        model = prepare_model(model, LTSConfig(weight_bits=4, activation_bits=4, freeze=name != "qat"))
    model.to(device).train()
    if frozen:
        g = torch.Generator(device=device).manual_seed(1)
        for layer in quantized_layers(model).values():
            layer.freeze_(torch.rand(layer.weight.shape, generator=g, device=device) < frozen)
    if name != "fp32":
        scratcher = LotteryTicketScratcher(model, total_steps=10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return model, optimizer, scratcher


def step(model, optimizer, scratcher, x, y) -> None:
    model(pixel_values=x, labels=y).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scratcher is not None:
        scratcher.step()


def check_exactness(args, device: torch.device) -> dict:
    """Freeze half the weights, train, and compare frozen latents/levels bit for bit."""
    model, optimizer, scratcher = variant("lts", args.tiny, device, 0.5)
    layers = quantized_layers(model)
    held = {n: (m.weight.detach().clone(), m.weight_levels.clone(), m.frozen_mask) for n, m in layers.items()}
    x, y = batch(args, device, seed=2)
    for _ in range(args.steps):
        model(pixel_values=x, labels=y).loss.backward()
        zero_grads = all(
            m.weight.grad is None or bool((m.weight.grad[held[n][2]] == 0).all()) for n, m in layers.items()
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scratcher.step()
    exact = all(
        torch.equal(m.weight.detach()[mask], w[mask]) and torch.equal(m.weight_levels[mask], q[mask])
        for n, m in layers.items()
        for w, q, mask in [held[n]]
    )
    full = next(iter(layers.values()))
    full.freeze_(torch.ones_like(full.weight, dtype=torch.bool))
    model(pixel_values=x, labels=y).loss.backward()
    return {
        "frozen_exact": exact,
        "frozen_grads_zero": zero_grads,
        "full_layer_grad_skipped": full.weight.grad is None,
    }


def batch(args, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    return x.to(device), torch.randint(0, 2, (args.batch,), generator=g).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per variant (after 3 warm-up steps)"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny ResNet (smoke runs)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **vars(args)}
    result.update(check_exactness(args, device))
    x, y = batch(args, device, seed=0)
    times = {}
    for name, frozen in [("fp32", 0.0), ("qat", 0.0), ("lts", 0.0), ("lts", 0.7), ("lts", 1.0)]:
        model, optimizer, scratcher = variant(name, args.tiny, device, frozen)
        samples = []
        for i in range(3 + args.steps):
            sync(device)
            start = time.perf_counter()
            step(model, optimizer, scratcher, x, y)
            sync(device)
            if i >= 3:
                samples.append(time.perf_counter() - start)
        times[f"{name}" + (f"@{frozen:.0%}" if name == "lts" else "")] = statistics.median(samples)
        del model, optimizer, scratcher
    result["median_step_seconds"] = times
    result["ratios_to_qat"] = {k: v / times["qat"] for k, v in times.items()}
    line = json.dumps(result)
    print(line)
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    if not (result["frozen_exact"] and result["frozen_grads_zero"] and result["full_layer_grad_skipped"]):
        raise SystemExit("exactness check failed")


if __name__ == "__main__":
    main()
