"""The dataclasses of the ``hf-lts`` options: every field is a ``--field value`` option and a recipe key."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import MODEL_TYPES, RESNET_SIZES


@dataclass
class ModelArguments:
    """Which model to train: a pretrained one, or one built from a config (random initialisation)."""

    _argument_group_name = "model"  # `HfArgumentParser` puts each dataclass's options under its own heading

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder of a pretrained image classifier; its head is resized to the labels."
        },
    )
    model_type: str = field(
        default="resnet",
        metadata={
            "help": "Architecture built from a config when model_name_or_path is unset.",
            "choices": MODEL_TYPES,
        },
    )
    model_size: str | None = field(
        default=None,
        metadata={
            "help": f"resnet: one of {list(RESNET_SIZES)} (default 18); mobilenet_v2: the width multiplier "
            "(default 1.0)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Fields of the model_type's config to change, as a JSON object (a mapping in YAML), e.g. "
            '{"depths": [1, 1]}. A recipe\'s model_size and config_overrides apply to its own model_type only.'
        },
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads; 1 suits tiny models, whose ops are too small for threads."
        },
    )


@dataclass
class DataArguments:
    """Which images to train and evaluate on, and how to preprocess them (`hf_lts.data`)."""

    _argument_group_name = "data"

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "digits, fashion_mnist, a folder (save_to_disk or imagefolder) or a Hub dataset id.",
            "aliases": ["--dataset"],
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on (default: validation/val/test, else a fifth of train)."},
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Column of the images (default: guessed)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Column of the labels (default: guessed)."}
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the square model input (train: default 224; eval: the model's config.image_size)."
        },
    )
    crop: str = field(
        default="auto",
        metadata={
            "help": "auto, padded (CIFAR style) or resized (ImageNet style).",
            "choices": ("auto", "padded", "resized"),
        },
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N examples only."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples only."}
    )
