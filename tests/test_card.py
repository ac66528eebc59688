"""Model cards: Hub metadata, LTS sections, the frozen-ratio plot, and nothing private."""

import os

import pytest
import torch
from helpers.tiny_models import tiny_resnet
from huggingface_hub import ModelCard

from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.card import CITATION, PLOT_FILE, build_model_card, hub_id, write_model_card

TOKEN = "hf_SecretTokenThatMustNeverLeak"
HISTORY = [(10, 0.0), (20, 0.05), (30, 0.4), (40, 0.7)]
EVAL = {
    "eval_loss": 0.9,
    "eval_accuracy": 0.625,
    "eval_top5_accuracy": 0.95,
    "eval_runtime": 1.5,
    "epoch": 3.0,
}


@pytest.fixture(scope="module")
def stats():
    model = prepare_model(tiny_resnet(), LTSConfig(weight_bits=2, activation_bits=2, freeze_schedule="sine"))
    model.train()(pixel_values=torch.randn(2, 3, 32, 32))
    scratcher = LotteryTicketScratcher(model, total_steps=40)
    first = next(iter(scratcher.layers.values()))
    first.freeze_(torch.rand(first.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    scratcher.step()
    return model.lts_config, scratcher.stats()


def test_card_metadata(stats):
    card = build_model_card(
        *stats,
        repo_id="me/resnet-w2a2-lts",
        base_model="microsoft/resnet-18",
        datasets=["uoft-cs/cifar10"],
        eval_results=EVAL,
        history=HISTORY,
        tags=["cifar"],
    )
    data = card.data.to_dict()
    assert data["library_name"] == "hf-lts" and data["pipeline_tag"] == "image-classification"
    assert {"lts", "quantization", "qat", "image-classification", "w2a2", "cifar"} <= set(data["tags"])
    assert data["base_model"] == "microsoft/resnet-18" and data["base_model_relation"] == "quantized"
    assert data["datasets"] == ["uoft-cs/cifar10"]
    [result] = data["model-index"][0]["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"]["type"] == "uoft-cs/cifar10"
    assert {(m["type"], m["value"]) for m in result["metrics"]} == {
        ("accuracy", 0.625),
        ("top_5_accuracy", 0.95),
    }
    # The card survives the Hub's round trip through README.md text.
    assert ModelCard(str(card)).data.to_dict() == data


def test_card_body(stats):
    config, run = stats
    text = str(build_model_card(config, run, repo_id="me/lts", eval_results=EVAL, history=HISTORY))
    layer = next(iter(run["per_layer"]))
    for expected in (
        "| W2A2 |",  # bits per layer group
        "| W8A8 |",
        "`sine`",  # schedule and its settings
        "momentum 0.99",
        "first 20% of the optimizer steps",
        f"| frozen weights at the end | {run['frozen_ratio']:.1%} |",
        f"| weight updates saved | {run['weight_updates_saved']:.1%} |",
        f"| backward FLOPs saved, counted (the paper's formula) | {run['backward_flops_saved']:.1%} |",
        f"| backward FLOPs saved, realised (weight gradients skipped) | {run['backward_flops_saved_realised']:.1%} |",
        f"| `{layer}` | 8/8 | {run['per_layer'][layer]['numel']:,} | {run['per_layer'][layer]['frozen_ratio']:.1%} |",
        f"![Frozen ratio over training]({PLOT_FILE})",
        'from_pretrained("me/lts")',
        "import hf_lts",
        "| accuracy | 0.6250 |",
        CITATION,
        "arXiv:2211.08544",
    ):
        assert expected in text, expected
    assert "runtime" not in text
    assert PLOT_FILE not in str(build_model_card(config, run))  # no history, no plot


def test_card_never_shows_local_paths_or_tokens(stats, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    local_model = tmp_path / "my-model"
    local_model.mkdir()
    monkeypatch.chdir(tmp_path)
    card = write_model_card(
        tmp_path / "out",
        *stats,
        base_model=str(local_model),
        datasets=["my-model", str(tmp_path / "data"), "../data"],  # local folders are not Hub ids
        eval_results=EVAL,
        history=HISTORY,
    )
    files = [(tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")]
    for blob in [str(card).encode(), *files]:
        assert str(tmp_path).encode() not in blob and TOKEN.encode() not in blob
    assert "base_model" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert hub_id("microsoft/resnet-18") == "microsoft/resnet-18"
    assert hub_id("/abs/path") is None and hub_id("my-model") is None and hub_id("a/../b") is None


def test_write_model_card_saves_readme_and_plot_atomically(stats, tmp_path):
    card = write_model_card(tmp_path, *stats, repo_id="me/lts", history=HISTORY)
    assert sorted(os.listdir(tmp_path)) == ["README.md", PLOT_FILE]  # no temporary file left behind
    assert (tmp_path / "README.md").read_text() == str(card)
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert oct((tmp_path / "README.md").stat().st_mode & 0o777) == "0o644"
