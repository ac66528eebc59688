"""ONNX export: agreement with PyTorch, file size, and ONNX Runtime latency against fp32 ONNX
and against ONNX Runtime's own int8 quantization of the same network.

    python -m benchmarks.onnx                  # both parts, writes the results and the README table
    python -m benchmarks.onnx --part latency   # the latency grid only (a few minutes)
    python -m benchmarks.onnx --quick          # seconds: digits only, few steps, no README update

Agreement: for each model, fp32 training (`transformers.Trainer`), then for each bit width LTS fine-tuning
from it (`LTSTrainer`, SGD, cosine schedule, as the accuracy benchmark does, with fewer steps), then
`hf_lts.export_onnx`, and on the whole test set (digits: the 360 validation images of the demo's split;
Fashion-MNIST: the 10,000 test images at 28×28) PyTorch's top-1, ONNX Runtime's top-1, the share of images
where both predict the same class and the largest |logit difference|; sizes of the QDQ ``model.onnx``, an
fp32 ONNX export of the same architecture, the packed ``model.safetensors`` and the fp32 ``state_dict``.

Latency: ResNet-18 (full width) and MobileNetV2 (width 1.0, ``tf_padding=False``) at 112 px, random weights
with non-trivial batch-norm statistics (latency does not depend on what was learned). Sessions (CPU
provider, default optimisations): the fp32 ONNX export, ONNX Runtime's ``quantize_static`` of it (QDQ,
per-channel int8 weights, uint8 activations, calibrated on random images: "ORT int8"), and the hf-lts
export at each bit width (per-channel weights). Median ``session.run`` time at batch 1 and 32, 1 and 2
intra-op threads, all sessions of one cell interleaved round by round so that the machine's load hits them
alike; reported as ratios within the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    Trainer,
)

from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments, export_onnx, prepare_model
from hf_lts.data import collate_fn, load_image_dataset, prepare_dataset
from hf_lts.export.packed import save_export

from .common import demo_resnet, resnet18, small_model, timed

RESULTS = Path(__file__).parent / "results" / "onnx.json"
README = Path(__file__).parent / "README.md"
START, END = "<!-- onnx:start -->", "<!-- onnx:end -->"


class Logits(torch.nn.Module):
    """The fp32 model's logits as a plain tensor, for ``torch.onnx.export``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def train(
    model: torch.nn.Module, data: Any, steps: int, batch_size: int, lr: float, seed: int, work: Path
) -> None:
    """SGD momentum 0.9, cosine schedule: fp32 with `transformers.Trainer`, a prepared model with
    `LTSTrainer` and its defaults (step sizes in their own group, the scratcher after each step)."""
    args = LTSTrainingArguments(
        str(work / "run"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        weight_decay=5e-5,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=seed,
    )
    if getattr(model, "lts_config", None) is None:
        Trainer(model=model, args=args, train_dataset=data, data_collator=collate_fn).train()
    else:
        LTSTrainer(model=model, args=args, train_dataset=data).train()
    model.eval()


def latency_ms(session: ort.InferenceSession, x: np.ndarray) -> float:
    return timed(session.run, ["logits"], {"pixel_values": x}) * 1e3


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(
    name: str, float_model: Any, bits: int, data: tuple[Any, dict], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """LTS fine-tuning of the fp32 model at ``bits``, the ONNX export, and its agreement, size and speed."""
    train_set, test = data
    model = prepare_model(copy.deepcopy(float_model), LTSConfig(weight_bits=bits, activation_bits=bits))
    start = time.perf_counter()
    train(model, train_set, args.steps, args.batch_size, args.lr, args.seed, work)
    train_s = time.perf_counter() - start
    pixels = test["pixel_values"]
    folder = work / f"{name}-w{bits}a{bits}"
    save_export(model, folder)
    start = time.perf_counter()
    qdq = export_onnx(model, folder, example_inputs=pixels[:2])
    export_s = time.perf_counter() - start
    fp32 = export_fp32(float_model, pixels[:2], folder / "fp32.onnx")
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, folder / "fp32.safetensors")

    with torch.no_grad():
        expected = torch.cat([model(pixel_values=b).logits for b in pixels.split(500)]).numpy()
    qdq_session, fp32_session = session(qdq, args.threads), session(fp32, args.threads)
    fp32_logits = np.concatenate(
        [fp32_session.run(["logits"], {"pixel_values": b.numpy()})[0] for b in pixels.split(500)]
    )
    got = np.concatenate(
        [qdq_session.run(["logits"], {"pixel_values": b.numpy()})[0] for b in pixels.split(500)]
    )
    labels = test["labels"].numpy()
    times: dict[str, list[float]] = {}
    for batch, repeats in ((1, args.repeats), (32, max(5, args.repeats // 4))):
        x = pixels[:batch].numpy()
        for s in (qdq_session, fp32_session):
            for _ in range(3):
                latency_ms(s, x)  # warm-up
        for _ in range(repeats):  # interleaved: the machine's load hits both alike
            times.setdefault(f"qdq_b{batch}", []).append(latency_ms(qdq_session, x))
            times.setdefault(f"fp32_b{batch}", []).append(latency_ms(fp32_session, x))
    record = {
        "model": name,
        "bits": f"W{bits}A{bits}",
        "test_images": len(labels),
        "train_steps": args.steps,
        "train_s": round(train_s, 1),
        "export_s": round(export_s, 1),
        "top1_fp32_onnx": float((fp32_logits.argmax(1) == labels).mean()),
        "top1_pytorch": float((expected.argmax(1) == labels).mean()),
        "top1_onnx": float((got.argmax(1) == labels).mean()),
        "agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(got - expected).max()),
        "onnx_qdq_bytes": qdq.stat().st_size,
        "onnx_fp32_bytes": fp32.stat().st_size,
        "packed_safetensors_bytes": (folder / "model.safetensors").stat().st_size,
        "fp32_safetensors_bytes": (folder / "fp32.safetensors").stat().st_size,
        **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
    }
    print(json.dumps(record), flush=True)
    return record


def export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``torch.onnx.export`` of the fp32 model (batch norms folded by its optimiser), without the exporter's
    per-node debugging metadata, as ``export_onnx`` writes its files."""
    torch.onnx.export(
        Logits(model).eval(),
        (example,),
        path,
        dynamo=True,
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        external_data=False,
        verbose=False,
    )
    stripped = onnx.load(path)
    graph = stripped.graph
    for item in (
        stripped,
        graph,
        *graph.node,
        *graph.value_info,
        *graph.initializer,
        *graph.input,
        *graph.output,
    ):
        del item.metadata_props[:]
    onnx.save(stripped, path)
    return path


def latency_model(name: str) -> torch.nn.Module:
    """Full-width ResNet-18 or MobileNetV2 with random batch-norm statistics (eval mode)."""
    torch.manual_seed(0)
    if name == "resnet18":
        model = resnet18(num_labels=2)  # the config's default head: the logits are not read
    else:
        model = MobileNetV2ForImageClassification(MobileNetV2Config(tf_padding=False))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def latency_grid(name: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One model's latency rows: each (threads, batch) cell's median times and ratios."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = latency_model(name)
    images = torch.randn(
        32, 3, args.latency_size, args.latency_size, generator=torch.Generator().manual_seed(0)
    )
    paths = {"fp32": export_fp32(model, images[:2], work / f"{name}-fp32.onnx")}

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"pixel_values": b.numpy()} for b in images.split(8))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    paths["ort_int8"] = work / f"{name}-ort-int8.onnx"
    quantize_static(
        paths["fp32"], paths["ort_int8"], Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    for bits in args.bits:
        lts = prepare_model(
            copy.deepcopy(model), LTSConfig(weight_bits=bits, activation_bits=bits, per_channel=True)
        )
        with torch.no_grad():
            lts(pixel_values=images[:16])  # the activation steps, from a first batch
        paths[f"W{bits}A{bits}"] = export_onnx(lts, work / f"{name}-w{bits}.onnx", example_inputs=images[:2])
    rows = []
    for threads in (1, 2):
        sessions = {k: session(p, threads) for k, p in paths.items()}
        for batch, repeats in ((1, args.repeats), (32, max(3, args.repeats // 10))):
            x = images[:batch].numpy()
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for s in sessions.values():
                for _ in range(2):
                    latency_ms(s, x)  # warm-up
            for _ in range(repeats):  # interleaved: the machine's load hits every session alike
                for k, s in sessions.items():
                    times[k].append(latency_ms(s, x))
            ms = {k: statistics.median(v) for k, v in times.items()}
            row = {"model": name, "threads": threads, "batch": batch, "repeats": repeats}
            row |= {f"{k}_ms": v for k, v in ms.items()}
            row |= {f"{k}_vs_ort_int8": v / ms["ort_int8"] for k, v in ms.items() if k.startswith("W")}
            row |= {f"{k}_vs_fp32": v / ms["fp32"] for k, v in ms.items() if k != "fp32"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    return [dict(r, bytes=sizes) for r in rows]


def latency_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    widths = [k[: -len("_vs_ort_int8")] for k in rows[0] if k.endswith("_vs_ort_int8")]
    head = (
        "| model | threads | batch | fp32 ms | ORT int8 × fp32 | "
        + " | ".join(f"{w} × ORT int8 (× fp32)" for w in widths)
        + " |"
    )
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(widths)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['batch']} | {r['fp32_ms']:.1f} | {r['ort_int8_vs_fp32']:.2f} | "
            + " | ".join(f"{r[f'{w}_vs_ort_int8']:.2f} ({r[f'{w}_vs_fp32']:.2f})" for w in widths)
            + " |"
        )
    return (
        f"Latency: `{meta['command']}`, {meta['latency_size']} px, median of interleaved runs; load average "
        f"{meta['latency_load_before']} before and {meta['latency_load_after']} after (2 cores shared with "
        "other jobs: the 2-thread cells compete with them and are the noisiest).\n\n" + "\n".join(lines)
    )


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = [
        "| model | bits | test images | top-1 fp32 | top-1 PyTorch | top-1 ONNX | same prediction | max \\|Δlogit\\| "
        "| QDQ ONNX KB | fp32 ONNX KB | × fp32 | ORT b1 ms QDQ / fp32 | ORT b32 ms QDQ / fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        rows.append(
            f"| {r['model']} | {r['bits']} | {r['test_images']:,} | {r['top1_fp32_onnx']:.2%} "
            f"| {r['top1_pytorch']:.2%} | {r['top1_onnx']:.2%} "
            f"| {r['agreement']:.2%} | {r['max_abs_logit_diff']:.1e} | {r['onnx_qdq_bytes'] / 1024:.0f} "
            f"| {r['onnx_fp32_bytes'] / 1024:.0f} | {r['onnx_qdq_bytes'] / r['onnx_fp32_bytes']:.3f} "
            f"| {r['qdq_b1_ms']:.2f} / {r['fp32_b1_ms']:.2f} | {r['qdq_b32_ms']:.1f} / {r['fp32_b32_ms']:.1f} |"
        )
    return (
        f"Command: `{meta['command']}`. Machine: {meta['machine']}; load average {meta['load_before']} before "
        f"and {meta['load_after']} after the run (other engineers' jobs share the cores: absolute times are "
        "inflated and noisy, the QDQ/fp32 pairs were measured interleaved). onnxruntime "
        f"{meta['onnxruntime']}, torch {meta['torch']}, {meta['threads']} intra-op thread(s); "
        f"each model trained {meta['fp_steps']} steps in fp32 (lr {meta['fp_lr']}), then {meta['steps']} LTS steps "
        f"per bit width (lr {meta['lr']}), batch {meta['batch_size']}.\n\n" + "\n".join(rows)
    )


def _load(dataset: str, size: int, quick: bool) -> tuple[Any, dict]:
    data = load_image_dataset(dataset, seed=0)
    if quick:
        data["validation"] = data["validation"].select(range(min(200, len(data["validation"]))))
    train_set = prepare_dataset(data["train"], size, train=True, hflip=dataset != "digits")
    test = prepare_dataset(data["validation"], size, train=False)[:]
    return train_set, test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 20 steps, no README update")
    parser.add_argument("--part", choices=["all", "agreement", "latency"], default="all")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="LTS fine-tuning learning rate")
    parser.add_argument("--fp-steps", type=int, default=200, help="fp32 training steps before LTS")
    parser.add_argument("--fp-lr", type=float, default=0.1)
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument(
        "--threads", type=int, default=1, help="agreement part: ONNX Runtime and torch threads"
    )
    parser.add_argument("--repeats", type=int, default=40, help="timed runs at batch 1 (batch 32: a tenth)")
    parser.add_argument("--latency-size", type=int, default=112, help="latency part: image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.fp_steps, args.bits, args.repeats, args.part = (
            min(args.steps, 20),
            20,
            [4],
            10,
            "agreement",
        )
    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {
        "command": "python -m benchmarks.onnx" + (" --quick" if args.quick else f" --part {args.part}"),
        "machine": "2-core x86-64 CPU (AVX-512 VNNI) shared with other jobs",
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    previous = json.loads(args.output.read_text()) if args.output.exists() and not args.quick else {}
    records, latency = previous.get("records", []), previous.get("latency", [])
    with tempfile.TemporaryDirectory() as work:
        if args.part in ("all", "agreement"):
            meta |= agreement_meta(args)
            records = agreement(args, Path(work))
            meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        else:
            meta |= {k: v for k, v in previous.get("meta", {}).items() if k not in meta}
        if args.part in ("all", "latency"):
            meta |= {"latency_size": args.latency_size, "latency_repeats": args.repeats, "bits": args.bits}
            meta["latency_load_before"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
            latency = [
                row for name in ("resnet18", "mobilenet_v2") for row in latency_grid(name, args, Path(work))
            ]
            meta["latency_load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    tables = [markdown(records, meta)] if records else []
    if latency:
        tables.append(latency_markdown(latency, meta))
    table = "\n\n".join(tables)
    print(table)
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps({"meta": meta, "records": records, "latency": latency}, indent=2) + "\n"
        )
        text = README.read_text()
        if START in text:
            text = text[: text.index(START) + len(START)] + "\n" + table + "\n" + text[text.index(END) :]
            README.write_text(text)
    return 0


def agreement_meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "threads": args.threads,
        "steps": args.steps,
        "lr": args.lr,
        "fp_steps": args.fp_steps,
        "fp_lr": args.fp_lr,
        "batch_size": args.batch_size,
    }


def agreement(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The trained models' agreement rows (see the module docstring)."""
    plan = [("demo-resnet (digits)", demo_resnet, "digits", 32)]
    if not args.quick:
        plan += [
            ("resnet18 (fashion-mnist)", lambda n: small_model("resnet18", n, 28), "fashion_mnist", 28),
            (
                "mobilenet_v2 (fashion-mnist)",
                lambda n: small_model("mobilenet_v2", n, 28),
                "fashion_mnist",
                28,
            ),
        ]
    records = []
    for name, build, dataset, size in plan:
        data = _load(dataset, size, args.quick)
        torch.manual_seed(args.seed)
        float_model = build(int(data[1]["labels"].max()) + 1)
        train(float_model, data[0], args.fp_steps, args.batch_size, args.fp_lr, args.seed, work)
        for bits in args.bits:
            records.append(measure(name, float_model, bits, data, args, work))
    return records


if __name__ == "__main__":
    raise SystemExit(main())
