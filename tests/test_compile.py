"""`torch.compile` of a prepared model (what `TrainingArguments(torch_compile=True)` does): one graph for the
whole forward and backward, no recompiles while weights freeze, the same training as without it."""

import pytest
import torch
import torch._dynamo
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.quantization import backend as backends

STEPS = 12


def model() -> nn.Module:
    torch.manual_seed(0)
    config = ResNetConfig(
        layer_type="basic", depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16, num_labels=10
    )
    lts = LTSConfig(channel_completion=0.6, distance_init="observed", freeze_warmup_ratio=0.0)
    return prepare_model(ResNetForImageClassification(config), lts).train()


def train(compile_backend: str | None, m: nn.Module | None = None, on_step=None):
    """``STEPS`` SGD steps (momentum, weight decay) with the scratcher, the model compiled from its first
    batch on (the one that initialises the quantizers); one batch is smaller, as an epoch's last one is."""
    m = model() if m is None else m
    optimizer = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scratcher = LotteryTicketScratcher(m, total_steps=STEPS)
    forward = m if compile_backend is None else torch.compile(m, backend=compile_backend)
    g = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        n = 6 if i == STEPS - 4 else 8
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        forward(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scratcher.step()
        if on_step is not None:
            on_step(i)
    return m, scratcher


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_compiled_model_trains_bit_for_bit_like_the_eager_one_and_compiles_once():
    """Dynamo's graph of the layers (AOTAutograd's backward, no Inductor: Inductor's own fusions change
    float roundings) computes what the layers compute outside it: weights, steps, LTS state, counters. After
    the first batch (quantizers initialised) and the smaller one (sizes become symbolic), nothing compiles
    again however many weights freeze: the graph reads no host-side count."""
    graphs = []

    def count(step):
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    with backends.forced("compiled"):  # the GPU's backend (the eager and native ones share its math)
        eager, scratcher = train(None)
        compiled, _ = train("aot_eager", on_step=count)
    assert scratcher.stats()["frozen_ratio"] > 0.3
    expected, got = eager.state_dict(), compiled.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    # steps 3 .. STEPS-5 and the last three: no new graph (the one at STEPS-4 is the smaller batch)
    assert len(set(graphs[2 : STEPS - 4])) == 1, graphs
    assert len(set(graphs[STEPS - 3 :])) == 1, graphs


@pytest.mark.slow  # (Inductor compiles for about two minutes on 2 CPU cores)
def test_inductor_trains_and_holds_frozen_weights():
    """The real compiler (Inductor's C++ kernels here, Triton on a GPU): the model trains, and frozen
    weights keep their latent value bit for bit while the optimizer steps."""
    m, held = model(), {}

    def snapshot(step):
        if step == STEPS // 2:
            held.update(
                {name: (layer.frozen_mask, layer.weight.detach().clone()) for name, layer in quantized(m)}
            )

    with backends.forced("compiled"):
        trained, scratcher = train("inductor", m, on_step=snapshot)
    assert scratcher.stats()["frozen_ratio"] > 0.3
    assert any(mask.any() for mask, _ in held.values())
    for name, layer in quantized(trained):
        mask, weight = held[name]
        assert torch.equal(layer.weight.detach()[mask], weight[mask]), name
        assert layer.frozen_mask[mask].all()
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def quantized(m: nn.Module):
    return [(n, mod) for n, mod in m.named_modules() if hasattr(mod, "frozen_mask")]


@pytest.mark.slow  # (the suite's time)
def test_trainer_with_torch_compile_trains_like_without(tmp_path):
    """`TrainingArguments(torch_compile=True)`: the LTS trainer's run equals the uncompiled one bit for bit
    (Dynamo's graphs without Inductor's roundings), evaluation included. The data are not augmented: the
    compiler draws from the global RNG the random crops draw from, so augmented runs differ in their crops."""
    from helpers.tiny_models import tiny_resnet

    from hf_lts import LTSTrainer, LTSTrainingArguments
    from hf_lts.data import load_image_dataset, prepare_dataset

    digits = load_image_dataset("digits")
    train_data = prepare_dataset(digits["train"].select(range(80)), 16, train=False)
    eval_data = prepare_dataset(digits["validation"].select(range(20)), 16, train=False)
    runs = []
    for compiled in (False, True):
        args = LTSTrainingArguments(
            str(tmp_path / str(compiled)), per_device_train_batch_size=8, learning_rate=0.05, optim="sgd",
            report_to="none", save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
            torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None,
        )  # fmt: skip
        with backends.forced("compiled"):
            trainer = LTSTrainer(
                model=tiny_resnet(num_labels=10),
                args=args,
                lts_config=LTSConfig(distance_momentum=0.5, freeze_warmup_ratio=0.2),
                train_dataset=train_data,
                eval_dataset=eval_data,
            )
            trainer.train()
            metrics = trainer.evaluate()
        runs.append((trainer.model.state_dict(), metrics["eval_accuracy"], trainer.scratcher.stats()))
    (expected, accuracy, stats), (got, accuracy_compiled, stats_compiled) = runs
    assert stats_compiled["frozen_ratio"] == stats["frozen_ratio"] > 0
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert accuracy_compiled == accuracy
