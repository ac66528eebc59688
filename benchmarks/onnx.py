"""ONNX QDQ export (issue #12): file size, ONNX Runtime latency against fp32 ONNX, agreement with PyTorch.

    python -m benchmarks.onnx                  # digits demo model + Fashion-MNIST models, writes the results
    python -m benchmarks.onnx --quick          # seconds: digits only, few steps, no README update

For each model: fp32 training (`transformers.Trainer`), then for each bit width LTS fine-tuning from it
(`LTSTrainer`, SGD, cosine schedule, as the accuracy benchmark does, with fewer steps), then `hf_lts.export_onnx`, and on the whole test set (digits: the 360 validation images of the
demo's split; Fashion-MNIST: the 10,000 test images, the accuracy benchmark's test set at its 28×28 size)
PyTorch's top-1, ONNX Runtime's top-1, the share of images where both predict the same class and the
largest |logit difference|. Sizes: the QDQ ``model.onnx``, an fp32 ONNX export of the same architecture
(``torch.onnx.export``, the default optimiser, batch norms folded, debugging metadata dropped), the packed ``model.safetensors`` and
the fp32 ``state_dict``. Latency: ONNX Runtime (CPU provider, default graph optimisations,
``--threads`` intra-op threads), median of repeated runs at batch 1 and 32, QDQ and fp32 sessions
interleaved so that the machine's load hits both alike. The models are the accuracy benchmark's (ResNet-18
layout at 1/4 width, MobileNetV2 at 0.35) and the CPU demo's ResNet.
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
from transformers import ResNetConfig, ResNetForImageClassification, Trainer

from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments, export_onnx, prepare_model
from hf_lts.data import collate_fn, load_image_dataset, prepare_dataset
from hf_lts.export.packed import save_export

from .accuracy import build_model

RESULTS = Path(__file__).parent / "results" / "onnx.json"
README = Path(__file__).parent / "README.md"
START, END = "<!-- onnx:start -->", "<!-- onnx:end -->"


def demo_model(num_labels: int) -> torch.nn.Module:
    """The CPU demo's model (`recipes/demo.yaml`): ResNet, 16/32/64 channels, one basic block per stage."""
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_labels=num_labels
    )
    return ResNetForImageClassification(config)


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
    start = time.perf_counter()
    session.run(["logits"], {"pixel_values": x})
    return (time.perf_counter() - start) * 1e3


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
    fp32 = folder / "fp32.onnx"
    torch.onnx.export(
        Logits(float_model).eval(),
        (pixels[:2],),
        fp32,
        dynamo=True,
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        external_data=False,
        verbose=False,
    )
    stripped = onnx.load(fp32)  # without the exporter's per-node debugging metadata, as export_onnx writes
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
    onnx.save(stripped, fp32)
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
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="LTS fine-tuning learning rate")
    parser.add_argument("--fp-steps", type=int, default=200, help="fp32 training steps before LTS")
    parser.add_argument("--fp-lr", type=float, default=0.1)
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch intra-op threads")
    parser.add_argument(
        "--repeats", type=int, default=100, help="timed runs at batch 1 (batch 32: a quarter)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.fp_steps, args.bits, args.repeats = min(args.steps, 20), 20, [4], 10
    torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    plan = [("demo-resnet (digits)", demo_model, "digits", 32)]
    if not args.quick:
        plan += [
            ("resnet18 (fashion-mnist)", lambda n: build_model("resnet18", n, 28), "fashion_mnist", 28),
            (
                "mobilenet_v2 (fashion-mnist)",
                lambda n: build_model("mobilenet_v2", n, 28),
                "fashion_mnist",
                28,
            ),
        ]
    records = []
    with tempfile.TemporaryDirectory() as work:
        for name, build, dataset, size in plan:
            data = _load(dataset, size, args.quick)
            torch.manual_seed(args.seed)
            float_model = build(int(data[1]["labels"].max()) + 1)
            train(float_model, data[0], args.fp_steps, args.batch_size, args.fp_lr, args.seed, Path(work))
            for bits in args.bits:
                records.append(measure(name, float_model, bits, data, args, Path(work)))
    meta = {
        "command": "python -m benchmarks.onnx" + (" --quick" if args.quick else ""),
        "machine": "2-core x86-64 CPU shared with other jobs",
        "load_before": load_before,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "lr": args.lr,
        "fp_steps": args.fp_steps,
        "fp_lr": args.fp_lr,
        "batch_size": args.batch_size,
    }
    table = markdown(records, meta)
    print(table)
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
        text = README.read_text()
        if START in text:
            text = text[: text.index(START) + len(START)] + "\n" + table + "\n" + text[text.index(END) :]
            README.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
