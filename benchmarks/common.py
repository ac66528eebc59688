"""What the benchmark harnesses share: the models they measure, their data, the fine-tuning budget and
arguments, timing, markdown tables and a free port. Harnesses import this, never each other."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_lts.data import FASHION_MNIST_DIR, read_idx
from hf_lts.models import model_config

NUM_LABELS = 10
#: The accuracy benchmark's small models (`small_model`), also measured by the speed harness
#: (``small-<name>``) and, the two CNNs, by the timing harness.
SMALL_MODELS = ("resnet18", "mobilenet_v2", "vit")


# -- models ------------------------------------------------------------------------------------------------
def resnet18(num_labels: int = NUM_LABELS, **fields: Any) -> ResNetForImageClassification:
    """ResNet-18's layout (`hf_lts.models`, basic blocks 2-2-2-2): full width, or narrowed by ``fields``."""
    return ResNetForImageClassification(model_config("resnet", "18", num_labels=num_labels, **fields))


def tiny_resnet(num_labels: int = NUM_LABELS) -> ResNetForImageClassification:
    """Two bottleneck stages of 8/16 channels: smoke runs and the soak's user script."""
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_labels)
    return ResNetForImageClassification(config)


def demo_resnet(num_labels: int) -> ResNetForImageClassification:
    """The CPU demo's widths (16/32/64 channels, one block per stage) in ResNetConfig's default bottleneck
    blocks: the ONNX agreement benchmark's smallest model."""
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_labels=num_labels
    )
    return ResNetForImageClassification(config)


def small_model(name: str, num_labels: int, image_size: int) -> nn.Module:
    """ResNet-18 layout (basic blocks, depths 2-2-2-2) at 1/4 width, MobileNetV2 at 0.35 width, or a ViT
    (patch 4, 4 layers of width 128, 4 heads, MLP 256).

    MobileNetV2 keeps its last convolution narrow too (``finegrained_output=False``; 1,280 channels would
    dominate the cost) and drops out 0.2 instead of 0.8, which suits a short training run. The ViT trains
    with its own optimizer and schedule (`MODEL_SETTINGS`).
    """
    if name == "resnet18":
        return resnet18(num_labels, hidden_sizes=[16, 32, 64, 128], embedding_size=16)
    if name == "mobilenet_v2":
        config = MobileNetV2Config(
            depth_multiplier=0.35,
            finegrained_output=False,
            classifier_dropout_prob=0.2,
            tf_padding=False,
            image_size=image_size,
            num_labels=num_labels,
        )
        return MobileNetV2ForImageClassification(config)
    if name == "vit":
        config = ViTConfig(
            image_size=image_size,
            patch_size=4,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            num_labels=num_labels,
        )
        return ViTForImageClassification(config)
    raise ValueError(f"unknown model {name!r}: use one of {SMALL_MODELS}")


def build_model(name: str, image_size: int, num_labels: int = NUM_LABELS) -> nn.Module:
    """A freshly initialised model by the speed harnesses' name (seeded: every variant starts alike)."""
    torch.manual_seed(0)
    if name == "resnet18":
        return resnet18(num_labels)
    if name == "mobilenetv2":
        return MobileNetV2ForImageClassification(
            MobileNetV2Config(image_size=image_size, num_labels=num_labels)
        )
    if name.startswith("small-"):  # the accuracy benchmark's small models (28 px in that benchmark)
        return small_model(name.removeprefix("small-"), num_labels, image_size)
    if name == "tiny":
        return tiny_resnet(num_labels)
    raise ValueError(
        f"unknown model {name!r}: use resnet18, mobilenetv2, small-resnet18, small-mobilenet_v2, small-vit or tiny"
    )


# -- data --------------------------------------------------------------------------------------------------
def training_images(count: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``count`` real images (3 × ``image_size``², normalised) with labels, and the data set's name:
    Fashion-MNIST's first training images where its Debian package is installed, else scikit-learn's digits."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        images = torch.from_numpy(read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:count].copy())
        labels = torch.from_numpy(read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:count].copy())
        name = "fashion-mnist"
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images[:count]).float()
        labels = torch.from_numpy(digits.target[:count])
        name = "digits"
    x = images.float().unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    return x.expand(-1, 3, -1, -1).contiguous(), labels.long(), name


# -- the fine-tuning budget --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How much data and how many optimizer steps a mode spends; QAT and LTS runs share all of it."""

    dataset: str
    train_samples: int | None
    eval_samples: int | None
    image_size: int
    batch_size: int
    fp_steps: int
    qat_steps: int
    fp_lr: float = 0.1
    qat_lr: float = 0.01
    fp_weight_decay: float = 1e-4
    qat_weight_decay: float = 5e-5
    log_points: int = 40  # frozen-ratio samples per run


BUDGETS = {
    "smoke": Budget("digits", 256, 128, 16, 32, fp_steps=4, qat_steps=5, log_points=5),
    "quick": Budget("fashion_mnist", 10_000, 2_000, 28, 64, fp_steps=300, qat_steps=150),
    "full": Budget("fashion_mnist", None, None, 28, 64, fp_steps=1_000, qat_steps=600),
}


#: Per-model overrides of `Budget` (a `small_model` name → settings). A ViT trained from scratch needs AdamW
#: with warm-up (DeiT's recipe, scaled to a short run), where SGD at lr 0.1 diverges, and learns slowly
#: without a CNN's inductive bias (58 % top-1 after 400 steps, 70 % after 1,000): it pre-trains
#: ``fp_steps_factor`` times as long. Its QAT fine-tuning uses AdamW at 1/10 the pre-training rate and
#: quantizes the attention matmuls' inputs too (``lts``: `LTSConfig` fields), as the ViT QAT literature does
#: (Q-ViT, arXiv 2210.06707), in QAT and LTS runs alike.
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "vit": dict(
        optim="adamw_torch",
        fp_lr=1e-3,
        qat_lr=1e-4,
        weight_decay=0.05,
        warmup_steps=0.1,
        fp_steps_factor=4,
        lts=dict(quantize_attention_matmuls=True),
    ),
}


def model_budget(budget: Budget, model: str) -> Budget:
    """``budget`` as ``model`` spends it: its fp32 pre-training ``fp_steps_factor`` times as long."""
    return replace(budget, fp_steps=budget.fp_steps * MODEL_SETTINGS.get(model, {}).get("fp_steps_factor", 1))


def training_args(
    cls: type, output_dir: str, budget: Budget, seed: int, quantized: bool, model: str = ""
) -> Any:
    """The Trainer arguments (``cls``) of a fp32 pre-training or a QAT/LTS fine-tuning run of ``budget``:
    SGD with momentum, or the optimizer of ``model``'s `MODEL_SETTINGS`."""
    steps = budget.qat_steps if quantized else budget.fp_steps
    override = MODEL_SETTINGS.get(model)
    if override is not None:
        optimizer = dict(
            optim=override["optim"],
            learning_rate=override["qat_lr" if quantized else "fp_lr"],
            weight_decay=override["weight_decay"],
            warmup_steps=override["warmup_steps"],
        )
    else:
        optimizer = dict(
            optim="sgd",
            optim_args="momentum=0.9",
            learning_rate=budget.qat_lr if quantized else budget.fp_lr,
            weight_decay=budget.qat_weight_decay if quantized else budget.fp_weight_decay,
        )
    return cls(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=256,
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps // budget.log_points),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=True,
        **optimizer,
    )


# -- timing, tables, ports ---------------------------------------------------------------------------------
def timed(fn: Callable[..., Any], *args: Any) -> float:
    """Wall seconds of one call ``fn(*args)``."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None
) -> list[str]:
    """The lines of a markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: l)."""
    align = align or "l" * len(header)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [
        "| " + " | ".join(header) + " |",
        rule,
        *("| " + " | ".join(map(str, row)) + " |" for row in rows),
    ]


def free_port() -> str:
    """A free local TCP port, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
