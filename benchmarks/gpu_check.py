"""The GPU check: one prepared script that says everything a GPU run can tell, in one go (≤ 8 minutes).

    python -m benchmarks.gpu_check                   # on a CUDA machine
    python -m benchmarks.gpu_check --device cpu --image-size 32 --batch 4 --steps 2 --tiny   # smoke run
    python -m benchmarks.gpu_check --profile         # and where a QAT step's host time goes
    python -m benchmarks.gpu_check --compile         # and the same steps under torch.compile

On synthetic data (nothing is downloaded), for ResNet-18 and MobileNetV2 at 224 px, batch 64:

- which kernel backend ran (`hf_lts.quantization.backend`) and how many graphs were compiled after the
  first steps (recompiles: should be 0);
- exactness on the device: frozen weights keep latent value and level bit for bit under SGD with momentum
  and weight decay, their gradients are zero, a fully frozen layer computes no weight gradient, and the
  compiled layer equals the eager one (outputs and gradients bit for bit, step gradients to 1e-5);
- step times (forward + backward + optimizer + scratcher, CUDA events over the timed steps) in float32 and
  under bf16 autocast of fp32, QAT, LTS bookkeeping (nothing frozen), a real freezing-phase step (channel
  completion 0.6, observed start), 90 % and 100 % of the output channels frozen; each as a ratio to QAT;
- host synchronisations of one freezing-phase step (``torch.cuda.set_sync_debug_mode``) and peak memory;
- the scratcher's CUDA graph against its eager updates, bit for bit;
- with two or more GPUs (or ``--ddp``, gloo on the CPU), two DDP processes of a freezing run: every rank
  ends with the same state, with the frozen-aware communication hook off and on.

It prints one JSON line and a table (``--output`` writes the JSON too).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import time
import traceback
import warnings

import torch
import torch._dynamo
from torch import nn
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from hf_lts import LotteryTicketScratcher, LTSConfig, QuantConv2d, prepare_model
from hf_lts.quantization import backend as backends
from hf_lts.quantization import quantized_layers
from hf_lts.quantization.kernel import compiled_kernels

VARIANTS = ("fp32", "qat", "lts", "lts-freezing", "lts-90%", "lts-90%-channels", "lts-100%")
#: Timed under ``--compile`` (a traced graph skips no channel: the 90 % row shows what freezing saves there).
COMPILED_VARIANTS = ("fp32", "qat", "lts", "lts-90%", "lts-100%")


def build(arch: str, tiny: bool) -> nn.Module:
    torch.manual_seed(0)
    if arch == "resnet18":
        sizes = dict(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8) if tiny else {}
        config = ResNetConfig(
            layer_type="basic", **{"depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], **sizes}
        )
        return ResNetForImageClassification(config)
    extra = dict(depth_multiplier=0.35) if tiny else {}
    return MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000, **extra))


def variant(arch: str, name: str, args, device: torch.device):
    """Model, optimizer and scratcher of one timed variant (see `VARIANTS`)."""
    model = build(arch, args.tiny)
    scratcher = None
    if name != "fp32":
        config = LTSConfig(weight_bits=4, activation_bits=4, freeze=name != "qat")
        if name == "lts-freezing":
            config = LTSConfig(
                weight_bits=4, activation_bits=4, channel_completion=0.6, distance_init="observed",
                freeze_warmup_ratio=0.0,
            )  # fmt: skip
        model = prepare_model(model, config)
    model.to(device).train()
    if name in ("lts-90%", "lts-90%-channels", "lts-100%"):
        # whole output channels frozen: the work LTS can skip; "-channels" skips the frozen channels' weight
        # gradients, where by default only fully frozen layers skip theirs off the CPU
        share = 1.0 if name == "lts-100%" else 0.9
        g = torch.Generator(device=device).manual_seed(1)
        for layer in quantized_layers(model).values():
            if name == "lts-90%-channels":
                layer.min_skipped_share_device = layer.min_skipped_share
            rows = torch.rand(layer.weight.shape[0], generator=g, device=device) < share
            layer.freeze_(rows.view(-1, *[1] * (layer.weight.dim() - 1)).expand_as(layer.weight))
    if name != "fp32":
        total = 4 * (3 + args.steps) if name == "lts-freezing" else 10_000
        scratcher = LotteryTicketScratcher(model, total_steps=total)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return model, optimizer, scratcher


def batch(args, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    return x.to(device), torch.randint(0, 2, (args.batch,), generator=g).to(device)


def train_step(model, optimizer, scratcher, x, y, dtype) -> None:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scratcher is not None:
        scratcher.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_syncs(fn, device: torch.device) -> int:
    """Host synchronisations ``fn`` makes (CUDA's sync debug mode), or -1 off CUDA."""
    if device.type != "cuda":
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def time_variant(
    arch: str, name: str, dtype: torch.dtype, args, device: torch.device, compiled: bool = False
) -> dict:
    model, optimizer, scratcher = variant(arch, name, args, device)
    if (
        compiled
    ):  # the whole forward and backward as Inductor graphs (`TrainingArguments(torch_compile=True)`)
        model = torch.compile(model)
    x, y = batch(args, device, seed=0)
    for _ in range(3):  # warm-up: compiles, cuDNN's algorithm search, the first LTS decisions
        train_step(model, optimizer, scratcher, x, y, dtype)
    sync(device)
    kernels = compiled_kernels() + torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(2):  # the better of two timed runs of ``steps`` steps, one synchronisation each
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, scratcher, x, y, dtype)
        sync(device)
        best = min(best, (time.perf_counter() - start) / args.steps)
    graphs = compiled_kernels() + torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = {"step_ms": best * 1e3, "recompiles": graphs - kernels}
    if scratcher is not None:
        result["syncs_per_step"] = count_syncs(
            lambda: train_step(model, optimizer, scratcher, x, y, dtype), device
        )
        result["frozen_ratio"] = scratcher.stats()["frozen_ratio"]
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def check_exactness(args, device: torch.device) -> dict:
    """Freeze half the weights, train, and compare frozen latents/levels bit for bit; a compiled layer
    against the eager one."""
    model, optimizer, _ = variant("resnet18", "lts", args, device)
    g = torch.Generator(device=device).manual_seed(1)
    for layer in quantized_layers(model).values():
        layer.freeze_(torch.rand(layer.weight.shape, generator=g, device=device) < 0.5)
    scratcher = LotteryTicketScratcher(model, total_steps=10_000)
    layers = quantized_layers(model)
    held = {n: (m.weight.detach().clone(), m.weight_levels.clone(), m.frozen_mask) for n, m in layers.items()}
    x, y = batch(args, device, seed=2)
    zero_grads = True
    for _ in range(args.steps):
        model(pixel_values=x, labels=y).loss.backward()
        zero_grads &= all(
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
        **compiled_equals_eager(device),
    }


def compiled_equals_eager(device: torch.device) -> dict:
    """One partly frozen convolution's output and gradients under the device's backend and eagerly."""
    torch.manual_seed(3)
    layer = QuantConv2d.from_float(nn.Conv2d(32, 64, 3, padding=1), 4, 4, per_channel=True).to(device)
    layer.freeze_(torch.rand_like(layer.weight) < 0.5)
    x = torch.randn(8, 32, 28, 28, device=device).relu()
    grad_out = torch.randn(8, 64, 28, 28, device=device)
    results = []
    for backend in (None, "eager"):
        with backends.forced(backend):
            layer._refresh_cache()
            for p in layer.parameters():
                p.grad = None
            xg = x.clone().requires_grad_()
            out = layer(xg)
            out.backward(grad_out)
            results.append([out, xg.grad, layer.weight.grad, layer.input_quantizer.scale.grad,
                            layer.weight_quantizer.scale.grad])  # fmt: skip
    bits = all(torch.equal(a, b) for a, b in zip(results[0][:3], results[1][:3], strict=True))
    steps = all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(results[0][3:], results[1][3:], strict=True)
    )
    return {"compiled_equals_eager": bits, "step_grads_close": steps}


def graph_equals_eager(args, device: torch.device) -> dict:
    """The scratcher replaying its CUDA graph against the same updates run eagerly: two copies of a model
    in the freezing phase (channel completion, layers freezing fully, so the graph is captured again),
    their weights moved the same way before every step (frozen ones too: the update restores them); every
    weight, state and step bit for bit."""
    model, _, _ = variant("resnet18", "lts-freezing", args, device)
    twin = copy.deepcopy(model)
    scratchers = [LotteryTicketScratcher(m, total_steps=12) for m in (model, twin)]
    scratchers[1]._graph.enabled = False
    pairs = list(zip(quantized_layers(model).values(), quantized_layers(twin).values(), strict=True))
    for t in range(14):
        for i, (a, b) in enumerate(pairs):
            g = torch.Generator(device=device).manual_seed(1000 * t + i)
            noise = torch.randn(a.weight.shape, generator=g, device=device)
            for layer in (a, b):
                with torch.no_grad():
                    layer.weight.add_(noise * 0.2 * layer.weight_quantizer.scale.detach().mean())
        for scratcher in scratchers:
            scratcher.step()
    sync(device)
    same = all(
        torch.equal(getattr(a, k), getattr(b, k))
        for a, b in pairs
        for k in ("weight", "lts_state", "lts_frozen_steps", "lts_step")
    ) and all(torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale) for a, b in pairs)
    return {"graph_equals_eager": same, "graph_frozen_ratio": scratchers[0].stats()["frozen_ratio"]}


def _ddp_worker(rank: int, world: int, store: str, hook: bool, args, out: str) -> None:
    """One rank of `ddp_check`: a freezing LTS run under DDP (deterministic kernels), its state's digest."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hf_lts.distributed import register_frozen_aware_hook

    cuda = args.device == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(minutes=5),  # a failed peer is an error, not a hang
    )  # fmt: skip
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    config = LTSConfig(
        weight_bits=4,
        activation_bits=4,
        channel_completion=0.6,
        distance_init="observed",
        freeze_warmup_ratio=0.0,
    )
    model = prepare_model(build("resnet18", args.tiny), config).to(device).train()
    ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    traffic = register_frozen_aware_hook(ddp) if hook else None
    steps = 12
    scratcher = LotteryTicketScratcher(model, total_steps=steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(8, 3, 64, 64, generator=g).to(device)
        y = torch.randint(0, 2, (8,), generator=g).to(device)
        ddp(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scratcher.step()
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if "running_" not in key and "num_batches_tracked" not in key:  # (BatchNorm statistics are per rank)
            digest.update(key.encode() + value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    result = {"digest": digest.hexdigest(), "frozen_ratio": scratcher.stats()["frozen_ratio"]}
    if traffic is not None:
        result["bytes_sent_share"] = traffic.bytes_sent / max(1, traffic.bytes_default)
    with open(f"{out}/rank{rank}-hook{int(hook)}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def ddp_check(args) -> dict:
    """Two processes (NCCL on two GPUs; gloo on the CPU for a smoke run) train the same freezing LTS run with
    the frozen-aware communication hook off and on: every rank ends with the same state, bit for bit, and
    so does the run with the hook (which skips fully frozen layers' zero gradients)."""
    import tempfile

    from torch import multiprocessing

    runs = {}
    for hook in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            multiprocessing.spawn(_ddp_worker, (2, f"{tmp}/store", hook, args, tmp), nprocs=2)
            runs[hook] = [json.load(open(f"{tmp}/rank{r}-hook{int(hook)}.json")) for r in range(2)]
    digests = {hook: {rank["digest"] for rank in ranks} for hook, ranks in runs.items()}
    return {
        "ddp_ranks_identical": all(len(d) == 1 for d in digests.values()),
        "ddp_hook_identical": digests[False] == digests[True],
        "ddp_frozen_ratio": runs[True][0]["frozen_ratio"],
        "ddp_hook_bytes_share": runs[True][0]["bytes_sent_share"],
    }


def profile(args, device: torch.device) -> str:
    """Where a QAT step's host time goes (ResNet-18, float32): the profiler's table of 3 steps."""
    model, optimizer, scratcher = variant("resnet18", "qat", args, device)
    x, y = batch(args, device, seed=0)
    for _ in range(3):
        train_step(model, optimizer, scratcher, x, y, torch.float32)
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            train_step(model, optimizer, scratcher, x, y, torch.float32)
        sync(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


def table(result: dict) -> str:
    lines = ["| model | precision | variant | step ms | × QAT | syncs/step | recompiles | peak MB | frozen |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in result["timings"].items():
        arch, precision, name = key.split("/")
        if "error" in row:
            lines.append(f"| {arch} | {precision} | {name} | error: {row['error'][:60]} | | | | | |")
            continue
        qat = result["timings"].get(f"{arch}/{precision}/qat", {}).get("step_ms")
        lines.append(
            f"| {arch} | {precision} | {name} | {row['step_ms']:.2f} | "
            f"{row['step_ms'] / qat if qat else float('nan'):.3f} | {row.get('syncs_per_step', '')} | "
            f"{row['recompiles']} | {row.get('peak_memory_mb', 0):.0f} | {row.get('frozen_ratio', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per run (two runs, after 3 warm-up)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke runs)")
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--output", default=None)
    parser.add_argument("--profile", action="store_true", help="print where a QAT step's host time goes")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time fp32, QAT, LTS bookkeeping, 90 %% and 100 %% frozen under torch.compile (fp32 rows)",
    )
    parser.add_argument(
        "--ddp", action="store_true", help="run the 2-process DDP check (on by itself with 2 or more GPUs)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__, **vars(args)}
    try:
        result.update(check_exactness(args, device))
    except Exception:
        result["exactness_error"] = traceback.format_exc()[-2000:]
    try:
        result.update(graph_equals_eager(args, device))
    except Exception:
        result["graph_error"] = traceback.format_exc()[-2000:]
    if args.ddp or device.type == "cuda" and torch.cuda.device_count() >= 2:
        try:
            result.update(ddp_check(args))
        except Exception:
            result["ddp_error"] = traceback.format_exc()[-2000:]
    if args.profile:
        print(profile(args, device), flush=True)
    result["timings"] = {}
    precisions = [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False)]
    if args.compile:
        precisions.append(("fp32+compile", torch.float32, True))
    for arch in args.models.split(","):
        for precision, dtype, compiled in precisions:
            for name in COMPILED_VARIANTS if compiled else VARIANTS:
                key = f"{arch}/{precision}/{name}"
                try:
                    result["timings"][key] = time_variant(arch, name, dtype, args, device, compiled)
                except Exception:
                    result["timings"][key] = {"error": traceback.format_exc()[-1500:]}
                if args.output:  # what was measured so far survives a time-out
                    with open(args.output, "w") as f:
                        f.write(json.dumps({**result, "backends": backends.decisions()}) + "\n")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result["backends"] = backends.decisions()
    line = json.dumps(result)
    print(line)
    print(table(result))
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    checks = ("frozen_exact", "frozen_grads_zero", "full_layer_grad_skipped", "compiled_equals_eager")
    checks += ("graph_equals_eager",) + (
        ("ddp_ranks_identical", "ddp_hook_identical") if "ddp_frozen_ratio" in result else ()
    )
    if not all(result.get(k) for k in checks):
        raise SystemExit("exactness check failed")


if __name__ == "__main__":
    main()
