"""Model cards of LTS exports: Hub metadata, the run's settings and savings, and a plot of the frozen ratio.

Cards are public: they hold only what the caller passes (config, statistics, Hub ids, metrics). Hub ids that
are really local paths are dropped, and no token is ever read here.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import LTSConfig
from .export import ONNX_FILE

PLOT_FILE = "frozen_ratio.png"
CARD_FILE = "README.md"
CITATION = """@article{zhong2022exploiting,
  title   = {Exploiting the Partly Scratch-off Lottery Ticket for Quantization-Aware Training},
  author  = {Zhong, Yunshan and Nan, Gongrui and Zhang, Yuxin and Chao, Fei and Ji, Rongrong},
  journal = {arXiv preprint arXiv:2211.08544},
  year    = {2022}
}"""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_METRICS = (
    ("eval_accuracy", "accuracy", "Top-1 accuracy"),
    ("eval_top5_accuracy", "top_5_accuracy", "Top-5 accuracy"),
)


def hub_id(value: str | None) -> str | None:
    """``value`` if it can be a Hub repo id and is not a local path, else ``None`` (a card never shows a
    local path, e.g. a ``_name_or_path`` of a model loaded from disk)."""
    if not value or not _HUB_ID.match(value) or ".." in value or os.path.exists(value):
        return None
    return value


def build_model_card(
    config: LTSConfig,
    stats: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    eval_results: Mapping[str, float] | None = None,
    history: Sequence[tuple[int, float]] | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
    onnx: bool = False,
) -> ModelCard:
    """The card of an LTS export.

    Args:
        config: the run's `LTSConfig`.
        stats: `LotteryTicketScratcher.stats()` at the end of training (or the export's ``lts_stats``).
        repo_id: where the model lives on the Hub, for the loading snippet.
        model_name: the card's title (default: the repo's name).
        base_model: the Hub model it was trained from (``base_model_relation: quantized``).
        datasets: Hub dataset ids; the first one names the evaluation in ``model-index``.
        eval_results: Trainer metrics; ``eval_accuracy`` and ``eval_top5_accuracy`` go into ``model-index``.
        history: ``(step, frozen_ratio)`` over training; the card then embeds `PLOT_FILE` (write it with
            `plot_frozen_ratio`, or use `write_model_card`, which does both).
        onnx: the export has an ONNX QDQ `ONNX_FILE` (``hf_lts.export_onnx``): adds the "Deploy" section.
    """
    repo_id, base_model = hub_id(repo_id), hub_id(base_model)
    datasets = [d for d in (hub_id(d) for d in datasets or ()) if d]
    bits_tag = f"w{config.weight_bits}a{config.activation_bits}"
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"lts-{bits_tag}")
    results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=datasets[0] if datasets else "custom",
            dataset_name=datasets[0] if datasets else "evaluation set",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=float(eval_results[key]),
        )
        for key, metric_type, metric_name in _METRICS
        if eval_results and key in eval_results
    ]
    data = ModelCardData(
        library_name="hf-lts",
        pipeline_tag="image-classification",
        tags=["lts", "quantization", "qat", "image-classification", bits_tag, *tags],
        license=license,
        base_model=base_model,
        datasets=datasets or None,
        model_name=name,
        eval_results=results or None,
        **({"base_model_relation": "quantized"} if base_model else {}),
    )
    sections = [
        f"# {name}",
        _summary(config, base_model, datasets),
        "## Quantization\n\n" + _bit_groups(config, stats),
        "## Freezing (LTS)\n\n" + _schedule(config, stats),
        *(["## Evaluation\n\n" + _results_table(eval_results)] if eval_results else []),
        *(
            [f"## Frozen ratio over training\n\n![Frozen ratio over training]({PLOT_FILE})"]
            if history
            else []
        ),
        "## Per-layer details\n\n" + _layer_table(stats),
        "## How to use\n\n" + _usage(repo_id),
        *([deploy_section(repo_id)] if onnx else []),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def plot_frozen_ratio(
    history: Sequence[tuple[int, float]], path: str | os.PathLike, *, warmup_steps: int | None = None
) -> None:
    """Save a PNG of the frozen ratio over the optimizer steps (written atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    steps, ratios = zip(*history, strict=True)
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, [100 * r for r in ratios], color="tab:blue")
    if warmup_steps:
        ax.axvspan(0, warmup_steps, color="0.9", label="warm-up (nothing freezes)")
        ax.legend(loc="upper left")
    ax.set(xlabel="optimizer step", ylabel="frozen weights (%)", ylim=(0, 100), xlim=(0, max(steps)))
    ax.grid(alpha=0.3)
    _atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))


def write_model_card(
    directory: str | os.PathLike, config: LTSConfig, stats: Mapping[str, Any], **kwargs: Any
) -> ModelCard:
    """`build_model_card`, saved as ``README.md`` in ``directory`` with its plot (when ``history`` is given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card = build_model_card(config, stats, onnx=(directory / ONNX_FILE).exists(), **kwargs)
    history = kwargs.get("history")
    if history:
        total = stats.get("total_steps") or max(step for step, _ in history)
        plot_frozen_ratio(
            history, directory / PLOT_FILE, warmup_steps=round(config.freeze_warmup_ratio * total)
        )
    _atomic_write(directory / CARD_FILE, lambda f: f.write(str(card).encode()))
    return card


def deploy_section(repo_id: str | None) -> str:
    """The card's "Deploy" section: the ONNX QDQ file and how to run it with ONNX Runtime."""
    return (
        "## Deploy\n\n"
        f"`{ONNX_FILE}` is the same model as standard ONNX (QDQ): the trained integer levels are int8 "
        "initializers with their steps (batch norms folded in) in `DequantizeLinear`, and each quantized layer's "
        "input passes a `QuantizeLinear`/`DequantizeLinear` pair (uint8) with its learned step, so ONNX Runtime "
        "computes the trained integer levels with nothing to calibrate, on its integer kernels (QLinearConv, "
        'ConvInteger; see hf-lts\'s README, "Deploy with ONNX", for their speed). Batch, height and width '
        "are free unless the export fixed them. "
        "`pip install onnxruntime huggingface_hub`, then:\n\n"
        "```python\n"
        "import numpy as np, onnxruntime as ort\n"
        "from huggingface_hub import hf_hub_download\n\n"
        f'session = ort.InferenceSession(hf_hub_download("{repo_id or "<repo-id>"}", "{ONNX_FILE}"))\n'
        "_, channels, *size = session.get_inputs()[0].shape  # a name where a dimension is free\n"
        "height, width = (s if isinstance(s, int) else 224 for s in size)\n"
        "pixel_values = np.zeros((4, channels, height, width), np.float32)  # normalised as in training\n"
        'print(session.run(["logits"], {"pixel_values": pixel_values})[0].argmax(1))\n'
        "```"
    )


def add_deploy_section(directory: str | os.PathLike, repo_id: str | None = None) -> bool:
    """Add the "Deploy" section to the card in ``directory`` when the folder has an `ONNX_FILE` and the
    card does not mention it yet (an ONNX file exported after the card was written). Returns whether the
    card changed."""
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not ((directory / ONNX_FILE).exists() and card_path.exists()):
        return False
    text = card_path.read_text()
    if "\n## Deploy\n" in text:
        return False
    section = deploy_section(hub_id(repo_id)) + "\n\n"
    cut = text.find("\n## Citation\n")
    text = text.rstrip("\n") + "\n\n" + section if cut < 0 else text[: cut + 1] + section + text[cut + 1 :]
    _atomic_write(card_path, lambda f: f.write(text.encode()))
    return True


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then `os.replace`: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _summary(config: LTSConfig, base_model: str | None, datasets: Sequence[str]) -> str:
    origin = f" from [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    data = f" on {', '.join(datasets)}" if datasets else ""
    return (
        f"A W{config.weight_bits}A{config.activation_bits} image classifier trained{origin}{data} with "
        "hf-lts: LSQ quantization-aware training with LTS, the lottery "
        "ticket scratcher, which freezes each weight once it has settled on its quantization level "
        "([arXiv 2211.08544](https://arxiv.org/abs/2211.08544)). The weights are stored as packed "
        f"{config.weight_bits}-bit integer codes with their step sizes."
    )


def _bit_groups(config: LTSConfig, stats: Mapping[str, Any]) -> str:
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, layer in stats.get("per_layer", {}).items():
        groups.setdefault(f"W{layer['weight_bits']}A{layer['activation_bits']}", []).append(
            (name, layer["numel"])
        )
    rows = ["| weights / inputs | layers | parameters | which |", "|---|---|---|---|"]
    for bits, layers in sorted(groups.items(), key=lambda g: -sum(n for _, n in g[1])):
        which = ", ".join(f"`{n}`" for n, _ in layers) if len(layers) <= 3 else "all other conv/linear layers"
        rows.append(f"| {bits} | {len(layers)} | {sum(n for _, n in layers):,} | {which} |")
    kept = [
        what
        for what, bits in (
            ("the first convolution", config.first_layer_bits),
            ("the classifier", config.last_layer_bits),
        )
        if bits is None
    ] + [f"`{p}`" for p in config.modules_to_not_convert]
    note = f"\n\nKept in full precision: {', '.join(kept)}." if kept else ""
    return (
        "Weights: signed LSQ, one learned step per "
        f"{'output channel' if config.per_channel else 'tensor'}. Inputs: LSQ, unsigned after ReLU, signed "
        "otherwise.\n\n" + "\n".join(rows) + note
    )


def _schedule(config: LTSConfig, stats: Mapping[str, Any]) -> str:
    if not config.freeze:
        return "Freezing was off (`freeze=False`): plain LSQ quantization-aware training, the LTS baseline."
    threshold = {
        "linear": "grows linearly from 0 to 1 step after warm-up (linear-growth)",
        "sine": "grows as sin(π/2·p) from 0 to 1 step after warm-up (sine-growth)",
        "constant": f"stays at {config.freeze_threshold} step (fixing)",
    }[config.freeze_schedule]
    steps = f" of {stats['total_steps']}" if stats.get("total_steps") else ""
    return "\n".join(
        [
            f"A weight freezes, for good, once the moving average of its distance to its level (momentum "
            f"{config.distance_momentum}) falls below a threshold that {threshold}; nothing freezes during "
            f"the first {config.freeze_warmup_ratio:.0%} of the optimizer steps.",
            "",
            "| | |",
            "|---|---|",
            f"| schedule | `{config.freeze_schedule}` |",
            f"| optimizer steps | {stats.get('step', 0)}{steps} |",
            f"| frozen weights at the end | {stats.get('frozen_ratio', 0.0):.1%} |",
            f"| weight updates saved | {stats.get('weight_updates_saved', 0.0):.1%} |",
            f"| backward FLOPs saved, counted (the paper's formula) | {stats.get('backward_flops_saved', 0.0):.1%} |",
            f"| backward FLOPs saved, realised (weight gradients skipped) | "
            f"{stats.get('backward_flops_saved_realised', 0.0):.1%} |",
        ]
    )


def _results_table(eval_results: Mapping[str, float]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [
        f"| {k.removeprefix('eval_')} | {v:.4f} |"
        for k, v in eval_results.items()
        if isinstance(v, float) and not k.endswith(("_runtime", "_per_second"))
    ]
    return "\n".join(rows)


def _layer_table(stats: Mapping[str, Any]) -> str:
    rows = ["| layer | bits (W/A) | parameters | frozen |", "|---|---|---|---|"]
    rows += [
        f"| `{name}` | {layer['weight_bits']}/{layer['activation_bits']} | {layer['numel']:,} | {layer['frozen_ratio']:.1%} |"
        for name, layer in stats.get("per_layer", {}).items()
    ]
    return "\n".join(rows)


def _usage(repo_id: str | None) -> str:
    return (
        "```python\n"
        "import hf_lts  # registers the LTS quantization method with transformers\n"
        "from transformers import AutoModelForImageClassification\n\n"
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id or "<repo-id>"}")\n'
        "```\n\n"
        "The model computes with the integer levels and step sizes it was trained with. Without "
        "`import hf_lts`, transformers cannot load it (it stops on the packed weights' shapes). It can be "
        "trained further with `hf_lts.LTSTrainer`: training restarts from the dequantized weights, with a "
        "fresh LTS state."
    )
