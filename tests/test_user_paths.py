"""The paths a new user walks (issue 14): model fields that stay with their model type, repeatable runs, a
card on every save, option help, and errors that say what to do."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_resnet

import hf_lts
from hf_lts.cli import build_model, main, parse_train_args, train_parser
from hf_lts.hub import HubUploadError

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}'
#: A few optimizer steps of a tiny model on a few digits: what the repeatability tests run.
TINY_RUN = [
    "train", "--config_overrides", TINY_MODEL, "--image_size", "16", "--max_train_samples", "64",
    "--max_eval_samples", "32", "--max_steps", "3", "--per_device_train_batch_size", "16",
    "--eval_strategy", "no", "--disable_tqdm", "true", "--hflip", "true",
]  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _labels(n: int = 10) -> tuple[dict[int, str], dict[str, int]]:
    return {i: str(i) for i in range(n)}, {str(i): i for i in range(n)}


def _env() -> dict[str, str]:
    """Subprocesses import this checkout's hf_lts, not whatever is installed."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- 1. a recipe's model fields stay with its model type ----------------------------------------------------
def test_the_demo_recipes_resnet_fields_do_not_reach_another_model_type():
    """The README's MobileNetV2 command starts from the demo recipe, whose model_size "18" and ResNet
    config_overrides once became an 18x-wide MobileNetV2 with inert ResNet fields (690 M parameters)."""
    model_args, *_ = parse_train_args(["--model_type", "mobilenet_v2", "--dataset", "fashion_mnist"])
    assert model_args.model_size is None and model_args.config_overrides is None
    model = build_model(model_args, *_labels())
    assert model.config.depth_multiplier == 1.0 and not hasattr(model.config, "hidden_sizes")
    assert sum(p.numel() for p in model.parameters()) < 3_000_000  # MobileNetV2 1.0: 2.2 M
    # The demo's own model type keeps its shape; a size given on the command line still applies.
    model_args, *_ = parse_train_args(["--model_type", "mobilenet_v2", "--model_size", "0.35"])
    assert model_args.model_size == "0.35"
    model_args, *_ = parse_train_args(["--model_type", "resnet"])
    assert model_args.config_overrides == {
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64],
        "depths": [1, 1, 1],
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model_type", "mobilenet_v2", "--config_overrides", '{"hidden_sizes": [8]}'],
            "config_overrides: hidden_sizes is not a field of MobileNetV2Config",
        ),
        (["--config_overrides", '{"depth": [1], "widht": 2}'], "depth, widht are not fields of ResNetConfig"),
    ],
)
def test_unknown_config_fields_are_an_error(argv, message, capsys):
    assert main(["train", *argv, "--max_train_samples", "8", "--output_dir", "out"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not Path("out").exists()  # the failed run leaves no folder behind


# -- 2. the same command gives the same weights ---------------------------------------------------------------
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_the_same_command_gives_bit_identical_weights_in_one_process(capsys):
    """Two runs in one interpreter: the global RNG is wherever the first run left it, so only seeding before
    the model is built makes the second equal the first (first-layer weights included)."""
    assert main([*TINY_RUN, "--output_dir", "a"]) == 0
    assert main([*TINY_RUN, "--output_dir", "b"]) == 0
    _assert_identical(_weights(Path("a")), _weights(Path("b")))
    assert main([*TINY_RUN, "--output_dir", "c", "--seed", "1"]) == 0
    c = _weights(Path("c"))
    assert not torch.equal(
        c["resnet.embedder.embedder.convolution.weight"],
        _weights(Path("a"))["resnet.embedder.embedder.convolution.weight"],
    )
    a_state = json.loads(Path("a/trainer_state.json").read_text())["log_history"]
    b_state = json.loads(Path("b/trainer_state.json").read_text())["log_history"]
    assert [e.get("loss") for e in a_state] == [e.get("loss") for e in b_state]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_the_same_command_gives_bit_identical_weights_in_two_processes(tmp_path):
    """``torchrun --nproc_per_node 2 -m hf_lts.cli train ...`` twice (gloo on CPU), with full_determinism."""
    for out in ("a", "b"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", _free_port(), "-m", "hf_lts.cli", *TINY_RUN,
               "--full_determinism", "true", "--output_dir", out]  # fmt: skip
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_identical(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


# -- 3. every final save carries its card -----------------------------------------------------------------
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


def test_save_model_writes_the_card_with_metrics_and_plot_and_a_readable_weights_file(tmp_path):
    """A user's script that trains, evaluates and saves gets the card, as the CLI does."""
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


# -- 4. option help ---------------------------------------------------------------------------------------
def test_every_lts_option_has_the_docstrings_help_and_the_groups_come_first(capsys):
    doc = inspect.cleandoc(hf_lts.LTSConfig.__doc__)
    actions = {a.dest: a for a in train_parser()._actions}
    fields = [f.name for f in dataclasses.fields(hf_lts.LTSConfig) if f.init]
    readme = (REPO / "README.md").read_text()
    for name in fields:
        text = actions[name].help
        assert text, name
        first_words = " ".join(text.split()[:4]).replace("None", "``None``").replace("False", "``False``")
        assert first_words in " ".join(doc.split()), (name, text)
        assert f"`{name}`" in readme  # the README's LTSConfig table documents it too
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    headings = ["\nmodel:", "\ndata:", "\nLTS (LTSConfig):", "\ntraining ("]
    positions = [help_text.index(h) for h in headings]
    assert positions == sorted(positions)
    assert help_text.index("--weight_bits") < help_text.index("--learning_rate")
    assert (
        "--freeze_schedule FREEZE_SCHEDULE, --freeze-schedule FREEZE_SCHEDULE\n                        threshold growth"
        in help_text
    )


# -- 5. errors that say what to do ------------------------------------------------------------------------
def test_eval_of_a_missing_folder_says_so(capsys):
    assert main(["eval", "--model", "/path/that/does/not/exist", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "repo id must" not in err.lower(), err


def test_training_into_a_saved_model_is_refused_unless_overwrite_output_dir(capsys):
    assert main([*TINY_RUN, "--output_dir", "out"]) == 0
    before = Path("out/model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*TINY_RUN, "--output_dir", "out", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a saved model: pass --overwrite_output_dir true" in err, err
    assert Path("out/model.safetensors").read_bytes() == before
    assert main([*TINY_RUN, "--output_dir", "out", "--seed", "1", "--overwrite_output_dir", "true"]) == 0
    assert Path("out/model.safetensors").read_bytes() != before


def test_a_failed_dataset_load_leaves_no_output_folder(capsys):
    assert main(["train", "--dataset", "fashion_mnist", "--data_dir", "nowhere", "--output_dir", "a/b"]) == 2
    assert "cannot load dataset 'fashion_mnist'" in capsys.readouterr().err
    assert not Path("a").exists()


def test_push_to_hub_without_network_raises_hub_upload_error(hub_server, monkeypatch, tmp_path):
    """The repo creation (`init_hf_repo`) raised httpx's ConnectError; the export is complete either way."""
    from huggingface_hub import constants, hf_api

    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(hf_api.api, "endpoint", dead)
    trainer = _trainer("run")
    with pytest.raises(HubUploadError, match="Could not upload run"):
        trainer.push_to_hub()
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(tmp_path / "run"))
