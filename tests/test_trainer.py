"""`LTSTrainer`: scratcher stepping, parameter groups, logging, exact resume, configuration errors."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch
from helpers.ports import free_port
from helpers.tiny_models import tiny_resnet
from safetensors import safe_open
from torch import nn
from transformers import TrainingArguments

import hf_lts
from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments, prepare_model
from hf_lts.data import load_image_dataset, prepare_dataset
from hf_lts.hub import HubUploadError
from hf_lts.quantization import quantized_layers, state

# Freezes within a few steps, so that short runs exercise frozen weights.
FAST_FREEZE = LTSConfig(weight_bits=4, activation_bits=4, distance_momentum=0.5, freeze_warmup_ratio=0.2)


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


@pytest.fixture(scope="module")
def train_data(digits):
    """120 digits at 16×16 with random crops and flips: 15 batches of 8."""
    return prepare_dataset(digits["train"].select(range(120)), 16, train=True)


@pytest.fixture(scope="module")
def eval_data(digits):
    return prepare_dataset(digits["validation"].select(range(40)), 16, train=False)


def make_args(output_dir: Path, **kwargs) -> LTSTrainingArguments:
    defaults = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=20,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=1e-4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    return LTSTrainingArguments(str(output_dir), **{**defaults, **kwargs})


def make_trainer(tmp_path: Path, train_data, eval_data=None, config=FAST_FREEZE, **kwargs) -> LTSTrainer:
    return LTSTrainer(
        model=tiny_resnet(num_labels=10),
        args=make_args(tmp_path, **kwargs),
        lts_config=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
    )


def test_scratcher_steps_once_per_optimizer_step_with_gradient_accumulation(tmp_path, train_data, eval_data):
    trainer = make_trainer(tmp_path, train_data, eval_data, gradient_accumulation_steps=3, max_steps=4)
    calls = []
    step = trainer.scratcher.step
    trainer.scratcher.step = lambda: (calls.append(trainer.state.global_step), step())[1]

    trainer.train()

    assert calls == [0, 1, 2, 3]  # after each optimizer step, before global_step counts it
    assert trainer.state.global_step == trainer.scratcher.step_count == 4
    assert trainer.scratcher.total_steps == trainer.state.max_steps == 4
    assert {int(layer.lts_step) for layer in quantized_layers(trainer.model).values()} == {4}

    metrics = trainer.evaluate()
    assert len(calls) == 4 and trainer.scratcher.step_count == 4  # evaluation never steps it
    assert 0 <= metrics["eval_accuracy"] <= metrics["eval_top5_accuracy"] <= 1


def test_total_steps_come_from_epochs(tmp_path, train_data):
    trainer = make_trainer(tmp_path, train_data, num_train_epochs=1, gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.scratcher.total_steps == trainer.state.max_steps == 8  # 15 batches, the last one alone
    assert trainer.scratcher.step_count == trainer.state.global_step


def test_parameter_groups(tmp_path, train_data):
    trainer = make_trainer(tmp_path, train_data, quantizer_learning_rate=0.001, weight_decay=0.01)
    optimizer = trainer.create_optimizer()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == sum(1 for _ in trainer.model.parameters())  # every parameter, once

    for name, param in trainer.model.named_parameters():
        group = group_of[id(param)]
        if name.endswith(("weight_quantizer.scale", "input_quantizer.scale")):
            assert (group["lr"], group["weight_decay"]) == (0.001, 0.0), name
        elif ".normalization." in name or name.endswith(".bias"):
            assert (group["lr"], group["weight_decay"]) == (0.05, 0.0), name
        else:
            assert param.ndim > 1, name
            assert (group["lr"], group["weight_decay"]) == (0.05, 0.01), name
    assert optimizer.defaults["momentum"] == 0.9

    # The scheduler scales the quantizer group like the others; by default it takes the model's rate.
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    assert scheduler.base_lrs[-1] == 0.001
    default = make_trainer(tmp_path, train_data).create_optimizer()
    assert default.param_groups[-1]["lr"] == 0.05


def test_lts_statistics_are_logged_and_reach_tensorboard(tmp_path, train_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, train_data, max_steps=8, logging_steps=4, report_to=["tensorboard"])
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [4, 8]
    keys = ("lts/frozen_ratio", "lts/weight_updates_saved", "lts/backward_flops_saved")
    assert all(key in entry for entry in logged for key in keys)
    assert logged[-1]["lts/frozen_ratio"] == pytest.approx(trainer.scratcher.stats()["frozen_ratio"])
    assert logged[-1]["lts/frozen_ratio"] > 0

    (event_file,) = glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    events = EventAccumulator(event_file)
    events.Reload()
    for key in keys:
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars][:2] == [4, 8], key
        assert scalars[1].value == pytest.approx(logged[1][key], rel=1e-6)


@pytest.mark.parametrize(
    ("num_examples", "augment"),
    [
        (80, True),  # checkpoint at an epoch boundary, random crops and flips
        # Mid-epoch, without random augmentation: transformers 5.x fetches the first batch after a mid-epoch
        # resume before restoring the RNG (huggingface/transformers#39215), so a random transform of that
        # batch differs; the model and LTS state themselves resume exactly either way.
        (120, False),
    ],
)
def test_resume_from_checkpoint_is_exact(tmp_path, digits, num_examples, augment):
    """20 steps straight and 10 + resume 10 give identical weights, levels, masks and distances."""
    data = prepare_dataset(digits["train"].select(range(num_examples)), 16, train=augment)
    kwargs = dict(max_steps=20, save_strategy="steps", save_steps=10)
    straight = make_trainer(tmp_path / "a", data, **kwargs)
    straight.train()

    checkpoint = tmp_path / "a" / "checkpoint-10"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    assert saved.keys() == straight.model.state_dict().keys()  # full training state, LTS buffers included
    assert saved["resnet.embedder.embedder.convolution.weight"].dtype == torch.float32
    total = straight.scratcher.stats()["quantized_weights"]
    frozen_at_10 = sum(int(state.frozen(v).sum()) for k, v in saved.items() if k.endswith("lts_state"))
    assert 0 < frozen_at_10 < total

    resumed = make_trainer(tmp_path / "b", data, **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    assert resumed.scratcher.stats() == straight.scratcher.stats()
    assert straight.scratcher.stats()["frozen_ratio"] > frozen_at_10 / total


class KwargsClassifier(nn.Module):
    """Like transformers' vision models: takes ``**kwargs`` (so the Trainer offers it loss kwargs) and
    returns a per-batch mean loss. No BatchNorm: a split batch then has exactly the gradient of the whole."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.conv = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4, 10)

    def forward(self, pixel_values, labels=None, **kwargs):
        logits = self.head(self.conv(torch.relu(self.stem(pixel_values))).mean((2, 3)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def test_split_batch_gives_the_same_update(tmp_path, digits):
    """The gradient of a global batch must not depend on how it is split (accumulation here, processes
    under DDP): transformers would scale the loss of a **kwargs model by either."""
    data = prepare_dataset(digits["train"].select(range(8)), 16, train=False)  # no random augmentation
    torch.manual_seed(0)
    model = prepare_model(KwargsClassifier(), LTSConfig(first_layer_bits=None, last_layer_bits=None))
    model(data[:8]["pixel_values"])  # initialise the activation quantizer on the whole batch, for both runs

    params = []
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = LTSTrainer(
            model=_clone(model),
            args=make_args(
                tmp_path,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                learning_rate=1.0,
                weight_decay=0.0,
            ),
            train_dataset=data,
        )
        trainer.train()
        params.append(dict(trainer.model.named_parameters()))
    for name, param in params[0].items():
        torch.testing.assert_close(params[1][name], param, rtol=1e-5, atol=1e-6, msg=name)


def _clone(model: nn.Module) -> nn.Module:
    clone = prepare_model(KwargsClassifier(), model.lts_config)
    clone.load_state_dict(model.state_dict())
    return clone


def test_prepared_model_keeps_its_config_and_a_conflicting_one_is_an_error(tmp_path, train_data):
    model = prepare_model(tiny_resnet(num_labels=10), LTSConfig(weight_bits=3, activation_bits=3))
    trainer = LTSTrainer(model=model, args=make_args(tmp_path), train_dataset=train_data)
    assert trainer.lts_config is model.lts_config and trainer.model is model
    LTSTrainer(model=model, args=make_args(tmp_path), lts_config=LTSConfig(weight_bits=3, activation_bits=3))
    with pytest.raises(ValueError, match="different config"):
        LTSTrainer(
            model=model, args=make_args(tmp_path), lts_config=LTSConfig(weight_bits=2, activation_bits=2)
        )


def test_distributed_defaults(tmp_path, train_data):
    args = make_args(tmp_path)
    assert (args.ddp_broadcast_buffers, args.ddp_find_unused_parameters, args.sync_batchnorm) == (
        False,
        False,
        False,
    )
    plain = TrainingArguments(str(tmp_path), report_to="none")  # unset options get the LTS defaults
    trainer = LTSTrainer(model=tiny_resnet(num_labels=10), args=plain, train_dataset=train_data)
    assert (plain.ddp_broadcast_buffers, plain.ddp_find_unused_parameters) == (False, False)
    assert trainer.model_accepts_loss_kwargs is False


def test_final_save_and_model_card(tmp_path, train_data, eval_data):
    trainer = make_trainer(tmp_path, train_data, eval_data, max_steps=6)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card(dataset="digits")

    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("checkpoint-*"))
    assert "W4A4" in (tmp_path / "README.md").read_text()


def _digits(n: int = 64):
    from hf_lts.data import load_image_dataset, prepare_dataset

    data = load_image_dataset("digits")
    return (
        prepare_dataset(data["train"].select(range(n)), 16, True, hflip=False),
        prepare_dataset(data["validation"].select(range(n)), 16, False),
    )


def _trainer(output_dir: str, **kwargs) -> hf_lts.LTSTrainer:
    train, val = _digits()
    args = hf_lts.LTSTrainingArguments(
        output_dir, max_steps=3, per_device_train_batch_size=16, logging_steps=1, report_to="none",
        use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True, **kwargs,
    )  # fmt: skip
    return hf_lts.LTSTrainer(
        model=tiny_resnet(num_labels=10), args=args, train_dataset=train, eval_dataset=val
    )


def test_save_model_writes_the_card_with_metrics_and_plot_and_a_readable_weights_file(tmp_path, monkeypatch):
    """A user's script that trains, evaluates and saves gets the card, as the CLI does."""
    monkeypatch.chdir(tmp_path)
    trainer = _trainer("run")
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model("final")
    card = (tmp_path / "final" / "README.md").read_text()
    assert "# final" in card and "## Evaluation" in card and f"{metrics['eval_accuracy']:.4f}" in card
    assert "frozen_ratio.png" in card and (tmp_path / "final" / "frozen_ratio.png").is_file()
    assert "github.com/hf-lts" not in card  # no placeholder repository link
    # Every file of the export is readable by others (a Hub mirror, a shared folder): model.safetensors was 0600.
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "final").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == "0o644", modes
    trainer.save_model()  # no folder: output_dir
    assert (tmp_path / "run" / "README.md").is_file()


def test_push_to_hub_without_network_raises_hub_upload_error(hub_server, monkeypatch, tmp_path):
    """The repo creation (`init_hf_repo`) raised httpx's ConnectError; the export is complete either way."""
    from huggingface_hub import constants, hf_api

    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(hf_api.api, "endpoint", dead)
    trainer = _trainer("run")
    with pytest.raises(HubUploadError, match="Could not upload run"):
        trainer.push_to_hub()
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(tmp_path / "run"))
