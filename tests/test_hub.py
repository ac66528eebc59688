"""Push to and download from a Hub (the local `hub_server` fixture), through the real huggingface_hub client."""

import socket
from pathlib import Path

import pytest
import torch
from helpers.hub_server import HubServer
from helpers.tiny_models import tiny_resnet
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors import safe_open
from transformers import AutoModelForImageClassification

import hf_lts
from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.card import PLOT_FILE, write_model_card
from hf_lts.cli import main as cli_main
from hf_lts.export.packed import save_export
from hf_lts.hub import HubUploadError, push_export, read_export
from hf_lts.quantizers import training_state


def trained_export(folder: Path, steps: int = 3):
    """A tiny W2A2 ResNet trained a few steps with the scratcher in a plain loop, exported to ``folder``."""
    model = prepare_model(
        tiny_resnet(num_labels=10), LTSConfig(weight_bits=2, activation_bits=2, freeze_warmup_ratio=0)
    )
    generator = torch.Generator().manual_seed(0)
    x, labels = (
        torch.randn(8, 3, 32, 32, generator=generator),
        torch.randint(0, 10, (8,), generator=generator),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scratcher = LotteryTicketScratcher(model, total_steps=steps)
    model.train()
    for _ in range(steps):
        model(pixel_values=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scratcher.step()
    save_export(model.eval(), folder)
    with torch.no_grad():
        return model(pixel_values=x).logits, x


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_download_into_an_empty_cache_gives_identical_logits(hub_server: HubServer, tmp_path):
    expected, x = trained_export(tmp_path / "export")
    commit = push_export(tmp_path / "export", "test-user/tiny-lts")

    assert sorted(HfApi().list_repo_files("test-user/tiny-lts")) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    loaded = AutoModelForImageClassification.from_pretrained(
        "test-user/tiny-lts", cache_dir=tmp_path / "empty-cache"
    )
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, expected)
    card = ModelCard.load(hf_hub_download("test-user/tiny-lts", "README.md", revision=commit.oid))
    assert card.data.library_name == "hf-lts" and "w2a2" in card.data.tags
    assert 'from_pretrained("test-user/tiny-lts")' in card.text


def test_trainer_push_to_hub_uploads_the_packed_export_with_its_card(hub_server: HubServer, tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 10} for i in range(12)
    ]
    args = hf_lts.LTSTrainingArguments(
        tmp_path / "run",
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=12,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        save_steps=2,
        hub_model_id="test-user/trainer-lts",
        report_to=[],
        use_cpu=True,
    )
    trainer = hf_lts.LTSTrainer(
        model=tiny_resnet(num_labels=10),
        args=args,
        lts_config=LTSConfig(weight_bits=2, activation_bits=2),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    trainer.push_to_hub()

    files = set(HfApi().list_repo_files("test-user/trainer-lts"))
    assert {"README.md", PLOT_FILE, "config.json", "model.safetensors"} <= files
    assert not any(f.startswith("checkpoint-") or f == "training_args.bin" for f in files)
    # Checkpoints keep the full training state locally and are not pushed; the pushed export is packed.
    assert (
        "lts_format"
        not in safe_open(tmp_path / "run" / "checkpoint-4" / "model.safetensors", "pt").metadata()
    )
    assert safe_open(tmp_path / "run" / "model.safetensors", "pt").metadata()["lts_format"] == "packed-v1"
    card = ModelCard.load(hf_hub_download("test-user/trainer-lts", "README.md"))
    assert card.data.eval_results[0].metric_type == "accuracy"
    assert f"![Frozen ratio over training]({PLOT_FILE})" in card.text
    loaded = AutoModelForImageClassification.from_pretrained(
        "test-user/trainer-lts", cache_dir=tmp_path / "cache"
    )
    pixels = torch.stack([d["pixel_values"] for d in data])
    with torch.no_grad():
        assert torch.equal(
            loaded(pixel_values=pixels).logits, trainer.model.eval()(pixel_values=pixels).logits
        )


def test_cli_push_and_eval_by_repo_id(hub_server: HubServer, tmp_path, capsys):
    trained_export(tmp_path / "export")
    assert cli_main(["push", "--repo-id", "test-user/cli-lts", str(tmp_path / "export")]) == 0
    assert "test-user/cli-lts" in capsys.readouterr().out
    assert (tmp_path / "export" / "README.md").exists()  # an export without a card gets one

    assert (
        cli_main(["eval", "--model", "test-user/cli-lts", "--dataset", "digits", "--image_size", "32"]) == 0
    )
    assert '"eval_accuracy"' in capsys.readouterr().out


def test_server_error_is_clear_and_leaves_the_export_intact(hub_server: HubServer, tmp_path, capsys):
    trained_export(tmp_path / "export")
    config, stats = read_export(tmp_path / "export")
    write_model_card(
        tmp_path / "export", config, stats, repo_id="test-user/tiny-lts", history=[(1, 0.1), (3, 0.2)]
    )
    before = snapshot(tmp_path / "export")
    hub_server.fail_commit_status = 500

    with pytest.raises(HubUploadError, match="Simulated commit failure.*local export is unchanged"):
        push_export(tmp_path / "export", "test-user/tiny-lts")
    assert cli_main(["push", "--repo-id", "test-user/tiny-lts", str(tmp_path / "export")]) == 1
    assert "hf-lts push: error: Could not upload export" in capsys.readouterr().err
    assert snapshot(tmp_path / "export") == before
    assert HfApi().list_repo_files("test-user/tiny-lts") == []


def test_refused_connection_is_clear_and_leaves_the_export_intact(tmp_path):
    trained_export(tmp_path / "export")
    write_model_card(tmp_path / "export", *read_export(tmp_path / "export"))
    before = snapshot(tmp_path / "export")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    with pytest.raises(HubUploadError, match=f"127.0.0.1:{port}.*refused.*local export is unchanged"):
        push_export(tmp_path / "export", "me/lts", endpoint=f"http://127.0.0.1:{port}", token="hf_dummy")
    assert snapshot(tmp_path / "export") == before


def test_push_refuses_training_state(hub_server: HubServer, tmp_path):
    model = prepare_model(tiny_resnet(), LTSConfig())
    with training_state(model):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a packed LTS export"):
        push_export(tmp_path, "test-user/oops")
    assert hub_server.requests == []
