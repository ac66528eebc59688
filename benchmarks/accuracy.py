"""Accuracy of LTS against plain LSQ QAT and fp32 on Fashion-MNIST.

    python -m benchmarks.accuracy --quick      # the whole grid on 10k images, 300 + 150 steps
    python -m benchmarks.accuracy              # the full budget: 60k images, 1,000 + 600 steps
    python -m benchmarks.accuracy --models resnet18 --methods lts --lts-option freeze_schedule=sine \
        --fp-cache /tmp/fp --output ablation.json --no-report      # an LTS variant (ablation)
    python -m benchmarks.accuracy --models vit --bits 4 3           # the ViT at W4A4 and W3A3

For each model (by default a ResNet-18 layout and a MobileNetV2, both narrowed for CPU; with ``--models vit``
a 4-layer ViT with patch 4, with its own optimizer and schedule, `common.MODEL_SETTINGS`; all built from
transformers configs) and each seed: fp32 pre-training with a plain `transformers.Trainer`, then QAT
fine-tuning from that checkpoint at W2A2 and W4A4 (``--bits``), once as plain LSQ QAT
(``LTSConfig(freeze=False)``) and once as LTS (linear schedule, warm-up 0.2, momentum 0.99), both through
`LTSTrainer` with the same hyperparameters, seed and hence the same data order and augmentations (LTS's
stochastic rounding uses a counter hash, not the global RNG). Each run becomes one JSON record (``--output``),
with its frozen-ratio history from the Trainer's log. The markdown table with the target checks and the plots
(``benchmarks/results/accuracy_<mode>.*``, ``accuracy_vit_<mode>.*`` for the ViT's records) are rebuilt from
the records; ``--from-json`` rebuilds them without training (e.g. after running models or seeds as parallel
processes, or to add ablation records). Ablations (``--lts-option KEY=VALUE``) appear as extra rows labelled
with their overrides and are left out of the target checks; ``--fp-cache`` lets them reuse the fp32
checkpoints. One intra-op thread per process (``--threads``): these models are too small for threads to pay,
and on the loaded shared 2-core machine two threads per process were 4–100× slower than one.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments
from hf_lts.data import FASHION_MNIST_DIR, collate_fn, label_maps, load_image_dataset, prepare_dataset
from hf_lts.metrics import compute_metrics

from .common import (
    BUDGETS,
    MODEL_SETTINGS,
    SMALL_MODELS,
    Budget,
    model_budget,
    small_model,
    timed,
    training_args,
)

RESULTS_DIR = Path(__file__).parent / "results"
MODELS = SMALL_MODELS
DEFAULT_MODELS = ("resnet18", "mobilenet_v2")  # the ViT on request (--models vit): its own bits and targets
METHODS = ("fp", "qat", "lts")
MACHINE = "2-core x86 CPU shared with other jobs, torch {torch} (CPU), 1 intra-op thread per process"


def load_data(budget: Budget, data_dir: Path) -> tuple[Any, Any, int]:
    """Train and evaluation datasets (first N examples of each split; Fashion-MNIST's are shuffled)."""
    try:
        data = load_image_dataset(budget.dataset, data_dir=data_dir if budget.dataset != "digits" else None)
    except FileNotFoundError as e:
        sys.exit(
            f"benchmarks.accuracy: {e}\nFashion-MNIST ships as a Debian package: "
            "`apt-get install -y dataset-fashion-mnist`, or pass --data-dir."
        )
    for split, limit in (("train", budget.train_samples), ("validation", budget.eval_samples)):
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    train = prepare_dataset(data["train"], budget.image_size, train=True)
    evaluation = prepare_dataset(data["validation"], budget.image_size, train=False)
    return train, evaluation, len(label_maps(data)[0])


def _record(
    trainer: Trainer, model: str, method: str, bits: int, seed: int, seconds: float, **extra: Any
) -> dict[str, Any]:
    metrics = trainer.evaluate()
    history = {e["step"]: e["lts/frozen_ratio"] for e in trainer.state.log_history if "lts/frozen_ratio" in e}
    stats = trainer.scratcher.stats() if isinstance(trainer, LTSTrainer) else {}
    return {
        "model": model,
        "weight_bits": bits,
        "activation_bits": bits,
        "method": method,
        "seed": seed,
        "top1": metrics["eval_accuracy"],
        "top5": metrics["eval_top5_accuracy"],
        "frozen_ratio": float(stats.get("frozen_ratio", 0.0)),
        "weight_updates_saved": float(stats.get("weight_updates_saved", 0.0)),
        "backward_flops_saved": float(stats.get("backward_flops_saved", 0.0)),
        "backward_flops_saved_realised": float(stats.get("backward_flops_saved_realised", 0.0)),
        "wall_seconds": seconds,
        "train_loss": next(e["train_loss"] for e in trainer.state.log_history if "train_loss" in e),
        "frozen_history": sorted(history.items()),
        **extra,
    }


def run_grid(
    mode: str,
    models: list[str],
    bits: list[int],
    seeds: list[int],
    methods: list[str],
    data_dir: Path,
    lts_options: dict[str, Any],
    command: str,
    output: Path,
    fp_cache: Path | None = None,
) -> list[dict[str, Any]]:
    """Every (model, seed): fp32 pre-training, then each (bits, method) fine-tuned from its checkpoint.

    ``output`` is rewritten after every run, so an interrupted grid keeps what it finished.
    """
    train, evaluation, num_labels = load_data(BUDGETS[mode], data_dir)
    variant = ", ".join(f"{k}={v}" for k, v in lts_options.items())
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            budget = model_budget(BUDGETS[mode], model_name)
            model_options = MODEL_SETTINGS.get(model_name, {}).get("lts", {})
            extra = {"mode": mode, "command": command, "budget": asdict(budget)}
            for seed in seeds:
                cache = fp_cache / f"{mode}-{model_name}-seed{seed}.pt" if fp_cache is not None else None
                if cache is not None and cache.exists():
                    fp_model = small_model(model_name, num_labels, budget.image_size)
                    saved = torch.load(cache, weights_only=True)
                    fp_model.load_state_dict(saved["state_dict"])
                    fp_record = json.loads(saved["record"])
                else:
                    torch.manual_seed(seed)
                    fp_model = small_model(model_name, num_labels, budget.image_size)
                    trainer = Trainer(
                        model=fp_model,
                        args=training_args(
                            TrainingArguments, tmp, budget, seed, quantized=False, model=model_name
                        ),
                        train_dataset=train,
                        eval_dataset=evaluation,
                        data_collator=collate_fn,
                        compute_metrics=compute_metrics,
                    )
                    trainer.remove_callback(PrinterCallback)
                    seconds = timed(trainer.train)
                    fp_record = _record(trainer, model_name, "fp", 32, seed, seconds, variant="", **extra)
                    if cache is not None:
                        cache.parent.mkdir(parents=True, exist_ok=True)
                        torch.save(
                            {"state_dict": fp_model.state_dict(), "record": json.dumps(fp_record)}, cache
                        )
                if "fp" in methods:
                    _add(records, fp_record, output)
                for b in bits:
                    for method in [m for m in methods if m != "fp"]:
                        options = {**lts_options, "freeze": True} if method == "lts" else {"freeze": False}
                        trainer = LTSTrainer(
                            model=copy.deepcopy(fp_model).train(),
                            args=training_args(
                                LTSTrainingArguments, tmp, budget, seed, quantized=True, model=model_name
                            ),
                            lts_config=LTSConfig(
                                weight_bits=b, activation_bits=b, **model_options, **options
                            ),
                            train_dataset=train,
                            eval_dataset=evaluation,
                        )
                        trainer.remove_callback(PrinterCallback)
                        seconds = timed(trainer.train)
                        label = variant if method == "lts" else ""
                        record = _record(
                            trainer, model_name, method, b, seed, seconds, variant=label, **extra
                        )
                        _add(records, record, output)
    return records


def _add(records: list[dict[str, Any]], r: dict[str, Any], output: Path) -> None:
    records.append(r)
    output.write_text(json.dumps(records, indent=1))
    print(
        f"[accuracy] {r['model']} {_label(r)} W{r['weight_bits']}A{r['activation_bits']} seed {r['seed']}: "
        f"top-1 {r['top1']:.4f}, frozen {r['frozen_ratio']:.1%}, updates saved {r['weight_updates_saved']:.1%},"
        f" {r['wall_seconds']:.0f} s",
        flush=True,
    )


# -- report --------------------------------------------------------------------------------------------------
def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, bits, method): means over seeds (top-1/top-5 in %, savings, wall time)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(
            (r["model"], r["weight_bits"], METHODS.index(r["method"]), r["variant"]), []
        ).append(r)
    rows = []
    for (model, bits, _, variant), rs in sorted(
        groups.items(), key=lambda kv: (MODELS.index(kv[0][0]), -kv[0][1], *kv[0][2:])
    ):
        rows.append(
            {
                "model": model,
                "bits": bits,
                "method": rs[0]["method"],
                "variant": variant,
                "label": _label(rs[0]),
                "seeds": len(rs),
                "top1": statistics.mean(100 * r["top1"] for r in rs),
                "top1_seeds": [100 * r["top1"] for r in sorted(rs, key=lambda r: r["seed"])],
                "top5": statistics.mean(100 * r["top5"] for r in rs),
                **{k: statistics.mean(r[k] for r in rs) for k in ("frozen_ratio", "weight_updates_saved")},
                "backward_flops_saved": statistics.mean(r["backward_flops_saved"] for r in rs),
                "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
            }
        )
    return rows


def _key(r: dict[str, Any]) -> tuple:
    return r["model"], r["method"], r["variant"], r["weight_bits"], r["seed"]


def _label(r: dict[str, Any]) -> str:
    """The method, with the LTSConfig overrides of an LTS variant (an ablation) in brackets."""
    return f"{r['method']} ({r['variant']})" if r["variant"] else r["method"]


def target_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #7's targets per model: LTS ≥ QAT at W2A2, within 0.3 points at W4A4, ≥ 60 % of weight
    updates saved, W4A4 within 1 point of fp32; plus the LTS/QAT wall-time ratio. The ViT has its own
    (`_vit_checks`)."""
    by = {(r["model"], r["bits"], r["method"]): r for r in rows if not r["variant"]}
    checks = []
    for model in dict.fromkeys(r["model"] for r in rows):
        if model == "vit":
            checks += _vit_checks(by)
            continue
        for bits in (2, 4):
            lts, qat = by.get((model, bits, "lts")), by.get((model, bits, "qat"))
            if lts is None or qat is None:
                continue
            delta = lts["top1"] - qat["top1"]
            ok = delta >= 0 if bits == 2 else delta >= -0.3
            goal = "LTS ≥ QAT" if bits == 2 else "LTS ≥ QAT − 0.3"
            checks.append((model, f"W{bits}A{bits} top-1 {goal}", f"{delta:+.2f} points", ok))
            saved = lts["weight_updates_saved"]
            checks.append(
                (model, f"W{bits}A{bits} weight updates saved ≥ 60 %", f"{saved:.1%}", saved >= 0.6)
            )
            fp = by.get((model, 32, "fp"))
            if bits == 4 and fp is not None:
                for r in (lts, qat):
                    gap = r["top1"] - fp["top1"]
                    name = f"W4A4 {r['method'].upper()} within 1 point of fp32"
                    checks.append((model, name, f"{gap:+.2f} points", gap >= -1.0))
            ratio = lts["wall_seconds"] / qat["wall_seconds"]
            checks.append((model, f"W{bits}A{bits} wall time LTS / QAT", f"{ratio:.2f}×", None))
    return [dict(zip(("model", "target", "value", "met"), c, strict=True)) for c in checks]


def _vit_checks(by: dict[tuple, dict[str, Any]]) -> list[tuple]:
    """Issue #24's targets for the ViT: LTS within QAT's seed noise (QAT's mean minus the spread of its
    seeds) at every bit width, W4A4 within 2 points of fp32; plus updates saved and the wall-time ratio."""
    checks = []
    fp = by.get(("vit", 32, "fp"))
    for bits in sorted({b for m, b, _ in by if m == "vit" and b != 32}, reverse=True):
        lts, qat = by.get(("vit", bits, "lts")), by.get(("vit", bits, "qat"))
        if lts is None or qat is None:
            continue
        noise = max(qat["top1_seeds"]) - min(qat["top1_seeds"])
        delta = lts["top1"] - qat["top1"]
        goal = f"W{bits}A{bits} top-1 LTS ≥ QAT − seed spread ({noise:.2f})"
        checks.append(("vit", goal, f"{delta:+.2f} points", delta >= -noise))
        checks.append(
            ("vit", f"W{bits}A{bits} weight updates saved", f"{lts['weight_updates_saved']:.1%}", None)
        )
        if bits == 4 and fp is not None:
            for r in (lts, qat):
                gap = r["top1"] - fp["top1"]
                name = f"W4A4 {r['method'].upper()} within 2 points of fp32"
                checks.append(("vit", name, f"{gap:+.2f} points", gap >= -2.0))
        ratio = lts["wall_seconds"] / qat["wall_seconds"]
        checks.append(("vit", f"W{bits}A{bits} wall time LTS / QAT", f"{ratio:.2f}×", None))
    return checks


def _vit_sentence(records: list[dict[str, Any]]) -> str:
    """How the ViT's runs differ from the budget's, if any record is the ViT's."""
    vit = next((r for r in records if r["model"] == "vit"), None)
    if vit is None:
        return ""
    return (
        " The ViT trains with AdamW instead (wd {weight_decay}, warm-up {warmup_steps:.0%} of the steps; lr "
        "{fp_lr} fp32, {qat_lr} QAT/LTS), pre-trains {fp_steps_factor}× as many steps as the CNNs ({steps:,})"
        ", and quantizes the inputs of its attention matmuls too."
    ).format(**MODEL_SETTINGS["vit"], steps=vit["budget"]["fp_steps"])


def markdown(records: list[dict[str, Any]], mode: str, plots: dict[str, str]) -> str:
    budget = Budget(**records[0]["budget"])
    rows = summarize(records)
    seeds = sorted({r["seed"] for r in records})
    train = "all 60,000" if budget.train_samples is None else f"{budget.train_samples:,}"
    evaluation = "all 10,000" if budget.eval_samples is None else f"{budget.eval_samples:,}"
    lines = [
        f"### {mode} mode",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in records)),
        "",
        f"{budget.dataset}: {train} training images, {evaluation} test images, {budget.image_size}×"
        f"{budget.image_size}, batch {budget.batch_size}; fp32 pre-training {budget.fp_steps} steps (SGD "
        f"lr {budget.fp_lr}, cosine, wd {budget.fp_weight_decay}), QAT/LTS fine-tuning {budget.qat_steps} steps"
        f" (SGD lr {budget.qat_lr}, cosine, wd {budget.qat_weight_decay}); first conv and classifier at 8 bits;"
        f" seeds {seeds}; means over seeds, per-seed top-1 in brackets." + _vit_sentence(records),
        "",
        "| model | W/A | method | top-1 % | top-5 % | frozen | updates saved | bwd FLOPs saved | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wa = "32/32" if r["method"] == "fp" else f"{r['bits']}/{r['bits']}"
        per_seed = ", ".join(f"{t:.2f}" for t in r["top1_seeds"])
        lines.append(
            f"| {r['model']} | {wa} | {r['label']} | {r['top1']:.2f} [{per_seed}] | {r['top5']:.2f} | "
            f"{r['frozen_ratio']:.1%} | {r['weight_updates_saved']:.1%} | {r['backward_flops_saved']:.1%} | "
            f"{r['wall_seconds']:.0f} |"
        )
    lines += ["", "| model | target | value | met |", "|---|---|---|---|"]
    for c in target_checks(rows):
        met = "—" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['model']} | {c['target']} | {c['value']} | {met} |")
    lines += [""] + [f"![{title}]({path})" for title, path in plots.items()] + [""]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], mode: str, out_dir: Path, stem: str) -> dict[str, str]:
    """Top-1 per method (bars: seed mean, dots: seeds) and frozen ratio over training of every LTS run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in records)]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    colors = {"fp": "tab:gray", "qat": "tab:blue", "lts": "tab:orange"}
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in summarize(records) if r["model"] == model]
        labels = []
        for i, r in enumerate(rows):
            values = (
                "/".join(part.split("=", 1)[1] for part in r["variant"].split(", ")) if r["variant"] else ""
            )
            method = f"{r['method']}\n{values}" if values else r["method"]
            labels.append("fp32" if r["method"] == "fp" else f"W{r['bits']}A{r['bits']}\n{method}")
            ax.bar(i, r["top1"], color=colors[r["method"]], hatch="//" if r["variant"] else None)
            ax.plot([i] * len(r["top1_seeds"]), r["top1_seeds"], "k.", ms=4)
        low = min(min(r["top1_seeds"]) for r in rows)
        ax.set_ylim(max(0.0, low - 3), min(100.0, max(r["top1"] for r in rows) + 1.5))
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel("top-1 %")
        ax.set_title(f"{model} — Fashion-MNIST ({mode})")
    fig.tight_layout()
    top1 = out_dir / f"{stem}_top1.png"
    fig.savefig(top1, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in records:
            if r["model"] == model and r["method"] == "lts" and r["frozen_history"]:
                steps, ratios = zip(*r["frozen_history"], strict=True)
                style = "-" if r["weight_bits"] == 2 else "--"
                name = f"W{r['weight_bits']}A{r['activation_bits']} seed {r['seed']}"
                ax.plot(steps, ratios, style, label=f"{name}, {r['variant']}" if r["variant"] else name)
        warmup = LTSConfig().freeze_warmup_ratio * Budget(**records[0]["budget"]).qat_steps
        ax.axvline(warmup, color="gray", ls=":", lw=1, label="end of warm-up (default 0.2)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("frozen ratio (LTS)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{model} ({mode}); QAT and fp32 never freeze")
        ax.legend(fontsize=7)
    fig.tight_layout()
    frozen = out_dir / f"{stem}_frozen.png"
    fig.savefig(frozen, dpi=110)
    plt.close(fig)
    return {
        "top-1 per method": top1.name,
        "frozen ratio over training": frozen.name,
    }


def report_stem(records: list[dict[str, Any]]) -> str:
    """``accuracy_<mode>``; records of a model outside the default grid (the ViT) name their models too,
    ``accuracy_vit_<mode>``, so that their report does not replace the default grid's."""
    models = [m for m in MODELS if any(r["model"] == m for r in records)]
    named = "" if set(models) <= set(DEFAULT_MODELS) else "_".join(models) + "_"
    return f"accuracy_{named}{records[0]['mode']}"


def write_report(records: list[dict[str, Any]], out_dir: Path) -> Path:
    """This mode's table, target checks and plots, as ``<report_stem>.md`` beside the plots."""
    mode, stem = records[0]["mode"], report_stem(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"{stem}.md"
    machine = MACHINE.format(torch=torch.__version__)
    report.write_text(
        markdown(records, mode, plot(records, mode, out_dir, stem)) + f"\nMachine: {machine}.\n"
    )
    return report


def _options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values parsed as JSON when they can be) into LTSConfig overrides for LTS runs."""
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    LTSConfig(**options)  # fail now, not after the fp32 pre-training
    return options


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_const", const="quick", dest="mode", help="≈15 min budget")
    budget.add_argument("--smoke", action="store_const", const="smoke", dest="mode", help="seconds, digits")
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST idx files")
    parser.add_argument("--output", type=Path, help="JSON records (default results/accuracy_<mode>.json)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lts-option", action="append", default=[], help="LTSConfig KEY=VALUE for LTS runs")
    parser.add_argument("--fp-cache", type=Path, help="keep/reuse the fp32 checkpoints here (for ablations)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-report", action="store_true", help="only write the JSON records")
    parser.add_argument("--from-json", nargs="+", type=Path, help="merge these records and report; no runs")
    args = parser.parse_args(argv)
    mode = args.mode or "full"

    if args.from_json:
        merged: dict[tuple, dict[str, Any]] = {}  # ablation runs repeat their fp32 records: keep the first
        for path in args.from_json:
            for r in json.loads(path.read_text()):
                merged.setdefault(_key(r), r)
        records = list(merged.values())
    else:
        torch.set_num_threads(args.threads)
        command = shlex.join(["python", "-m", "benchmarks.accuracy", *argv])
        lts_options = _options(args.lts_option)
        output = args.output or args.results_dir / f"accuracy_{mode}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        records = run_grid(
            mode,
            args.models,
            args.bits,
            args.seeds,
            args.methods,
            args.data_dir,
            lts_options,
            command,
            output,
            args.fp_cache,
        )
    if not args.no_report:
        print(f"Wrote {write_report(records, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
