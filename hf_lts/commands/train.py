"""``hf-lts train``: build, train, evaluate, save, write the model card, print the summary."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import enable_full_determinism, set_seed

from ..data import label_maps, prepare_dataset
from ..trainer import LTSTrainer
from .common import build_model, check_output_dir, image_processor, load_data, remove_empty
from .errors import UsageError
from .recipes import parse_train_args


def train_command(argv: Sequence[str]) -> int:
    """``hf-lts train``: build, train, evaluate, save, write the model card, print the summary."""
    start = time.perf_counter()
    model_args, data_args, lts_config, training_args = parse_train_args(argv)
    overwrite = training_args.overwrite_output_dir or training_args.resume_from_checkpoint is not None
    created = check_output_dir(training_args.output_dir, overwrite=overwrite)
    if model_args.torch_num_threads is not None:
        torch.set_num_threads(model_args.torch_num_threads)

    try:
        data = load_data(data_args, training_args.seed)
        id2label, label2id = label_maps(data)
        # Seeded before the model is built, so that its initial weights, like everything after, depend on
        # the seed alone: the same command gives bit-identical weights (the Trainer seeds only later).
        (enable_full_determinism if training_args.full_determinism else set_seed)(training_args.seed)
        model = build_model(model_args, id2label, label2id)
    except UsageError:
        remove_empty(created)
        raise
    image_size = data_args.image_size or 224
    model.config.image_size = image_size  # read back by `hf-lts eval`
    processor = image_processor(model_args.model_name_or_path)
    datasets = {
        split: prepare_dataset(
            data[split],
            image_size,
            split == "train",
            crop=data_args.crop,
            hflip=data_args.hflip,
            image_processor=processor,
        )
        for split in ("train", "validation")
    }
    trainer = LTSTrainer(
        model=model,
        args=training_args,
        lts_config=lts_config,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        processing_class=processor,
    )

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    trainer.create_model_card(dataset=data_args.dataset_name, finetuned_from=model_args.model_name_or_path)
    if trainer.is_world_process_zero():
        print_summary(trainer, metrics, time.perf_counter() - start)
    return 0


def print_summary(trainer: LTSTrainer, metrics: dict[str, float], seconds: float) -> None:
    stats = trainer.scratcher.stats()
    config = trainer.lts_config
    rows = [
        ("eval accuracy", f"{metrics.get('eval_accuracy', float('nan')):.4f}"),
        ("eval top-5 accuracy", f"{metrics.get('eval_top5_accuracy', float('nan')):.4f}"),
        ("frozen weights", f"{stats['frozen_ratio']:.1%}"),
        ("weight updates saved", f"{stats['weight_updates_saved']:.1%}"),
        ("backward FLOPs saved, counted", f"{stats['backward_flops_saved']:.1%}"),
        ("backward FLOPs saved, realised", f"{stats['backward_flops_saved_realised']:.1%}"),
        ("optimizer steps", str(stats["step"])),
        ("wall time", f"{seconds:.1f} s"),
        ("saved to", trainer.args.output_dir),
    ]
    title = f"LTS W{config.weight_bits}A{config.activation_bits} summary"
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n{'-' * len(title)}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
