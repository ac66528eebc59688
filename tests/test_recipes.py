"""Every recipe parses and builds a trainer (a tiny model and tiny data swapped in); the paper's settings hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_mobilenet, tiny_resnet
from helpers.tiny_zoo import tiny_zoo_model

import hf_lts
from hf_lts import LTSTrainer
from hf_lts.commands.recipes import DEMO_RECIPE, load_recipe, parse_train_args
from hf_lts.data import load_image_dataset, prepare_dataset
from hf_lts.quantization.attention import matmul_quantizers

RECIPES = Path(__file__).parent.parent / "recipes"
# Training recipes: not the partial ones (_*.yaml) nor the Accelerate launch configs (recipes/accelerate/).
RUNNABLE = sorted(
    p for p in RECIPES.rglob("*.yaml") if not p.name.startswith("_") and p.parent.name != "accelerate"
)
IMAGENET = [p for p in RUNNABLE if p.parent.name == "imagenet"]
DEIT = [p for p in IMAGENET if p.stem.startswith("deit")]


@pytest.fixture(scope="module")
def tiny_data():
    return prepare_dataset(load_image_dataset("digits")["train"].select(range(16)), 16, train=True)


def test_the_paper_grid_is_there():
    names = {p.stem for p in IMAGENET}
    cnns = {f"{m}_w{b}a{b}" for m in ("resnet18", "resnet50", "mobilenet_v2") for b in (2, 3, 4)}
    assert names == cnns | {"deit_small_w4a4", "deit_small_w3a3"}
    assert RECIPES / "demo.yaml" in RUNNABLE and RECIPES / "cifar10_resnet20_w2a2.yaml" in RUNNABLE


def test_the_demo_recipe_is_one_file_shipped_with_the_package():
    packaged = Path(hf_lts.__file__).parent / "recipes" / "demo.yaml"
    assert (RECIPES / "demo.yaml").resolve() == packaged.resolve()  # recipes/demo.yaml links to it
    assert load_recipe(packaged) == DEMO_RECIPE and DEMO_RECIPE["dataset_name"] == "digits"


@pytest.mark.parametrize("recipe", RUNNABLE, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses_and_builds_a_trainer(recipe, tmp_path, tiny_data):
    model_args, data_args, lts, training = parse_train_args(
        ["--config", str(recipe), "--output_dir", str(tmp_path)]
    )
    assert data_args.dataset_name
    if recipe in DEIT:  # Q-ViT's (arXiv 2210.06707): 300 epochs, batch 512, lr 2e-4; AdamW for its LAMB
        assert training.optim == "adamw_torch" and not training.optim_args and training.learning_rate == 2e-4
        assert training.num_train_epochs == 300 and lts.quantize_attention_matmuls
        assert training.per_device_train_batch_size * 8 == 512
        assert (lts.first_layer_bits, lts.last_layer_bits) == (8, 8)
    else:
        assert training.optim == "sgd" and "momentum=0.9" in training.optim_args

    bits = re.search(r"w(\d)a(\d)", recipe.stem)
    if bits:
        assert (lts.weight_bits, lts.activation_bits) == tuple(map(int, bits.groups()))
    if recipe in IMAGENET:  # LTS.md §3: 100 epochs, 20 of them warm-up, linear growth, m = 0.9999
        assert training.num_train_epochs == (300 if recipe in DEIT else 100) and model_args.model_name_or_path
        assert (lts.freeze_schedule, lts.freeze_warmup_ratio, lts.distance_momentum) == (
            "linear",
            0.2,
            0.9999,
        )
    if recipe.stem.startswith("cifar"):  # 400 epochs, warm-up 80, m = 0.99
        assert training.num_train_epochs == 400
        assert (lts.freeze_schedule, lts.freeze_warmup_ratio, lts.distance_momentum) == ("linear", 0.2, 0.99)

    if recipe in DEIT:
        model = tiny_zoo_model("deit", num_labels=10)
    else:
        model = tiny_mobilenet(num_labels=10) if "mobilenet" in recipe.stem else tiny_resnet(num_labels=10)
    trainer = LTSTrainer(
        model=model, args=training, lts_config=lts, train_dataset=tiny_data, eval_dataset=tiny_data
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    if recipe in DEIT:
        assert isinstance(trainer.optimizer, torch.optim.AdamW)
        assert len(matmul_quantizers(trainer.model)) == trainer.model.config.num_hidden_layers
    else:
        assert (
            isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["momentum"] == 0.9
        )
    assert trainer.lts_config is lts
