"""The ``hf-lts`` command line: recipes and overrides, a tiny training run, evaluation, user errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import datasets
import pytest
import torch

from hf_lts.cli import DEMO_RECIPE, main, parse_train_args

TINY_MODEL = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}'


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI writes relative to the working directory (``lts-output`` by default); it also sets torch's
    thread count, restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _no_columns(tmp_path: Path) -> str:
    datasets.Dataset.from_dict({"text": ["a", "b"], "score": [0.5, 1.0]}).save_to_disk(str(tmp_path / "data"))
    return str(tmp_path / "data")


def _unknown_field_recipe(tmp_path: Path) -> str:
    (tmp_path / "recipe.yaml").write_text("learning_rate: 0.1\nwieght_bits: 2\n")
    return str(tmp_path / "recipe.yaml")


def _blocked(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("not a folder")
    return str(tmp_path / "file" / "out")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--weight_bits", "9"], "LTSConfig.weight_bits=9 is not supported"),
        (["train", "--no_such_field", "1"], "unknown argument(s) --no_such_field 1"),
        (["train", "--learning_rate", "fast"], "invalid float value: 'fast'"),
        (["train", "--freeze_schedule", "cubic"], "freeze_schedule='cubic' is unknown"),
        (["train", "--config", "missing.yaml"], "recipe 'missing.yaml' not found"),
        (["train", "--config", _unknown_field_recipe], "unknown field(s) wieght_bits"),
        (["train", "--output_dir", _blocked], "is not writable"),
        (["train", "--dataset_name", _no_columns], "cannot tell which column holds the images"),
        (["train", "--model_size", "19", "--max_train_samples", "8"], "resnet sizes are"),
        (["train", "--config_overrides", "{depths: [1]}", "--max_train_samples", "8"], "not a JSON object"),
        (["eval", "--dataset", "digits"], "the following arguments are required: --model"),
        (["eval", "--model", lambda tmp: str(tmp), "--dataset", "digits"], "cannot load model"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_and_exit_status_2(tmp_path, capsys, argv, message):
    argv = [arg(tmp_path) if callable(arg) else arg for arg in argv]
    capsys.readouterr()  # progress bars of the set-up above
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"hf-lts {argv[0]}: error: " if argv[0] in ("train", "eval") else "hf-lts: error: ")
    assert message in err
    assert not (tmp_path / "lts-output" / "config.json").exists()


def test_module_entry_point_exits_2_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "hf_lts.cli", "train", "--weight_bits", "1"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hf-lts train: error: LTSConfig.weight_bits=1 is not supported: use an integer from 2 to 8."
    ]
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hf-lts"]
    assert script.value == "hf_lts.cli:main"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--dataset_name" in capsys.readouterr().out


def test_recipe_base_and_command_line_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "dataset_name: digits\nlearning_rate: 0.1\nweight_bits: 2\nmodel_type: mobilenet_v2\nmodel_size: '0.5'\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../base.yaml\nweight_bits: 3\nactivation_bits: 3\nmodules_to_not_convert: classifier\n"
        "config_overrides: {depths: [1, 1]}\nnum_train_epochs: 7\n"
    )
    model, data, lts, training = parse_train_args(
        [
            "--config",
            "sub/child.yaml",
            "--learning_rate",
            "0.5",
            "--first_layer_bits",
            "none",
            "--output_dir",
            "o",
        ]
    )
    assert (model.model_type, model.model_size, model.config_overrides) == (
        "mobilenet_v2",
        "0.5",
        {"depths": [1, 1]},
    )
    assert data.dataset_name == "digits" and data.image_size is None
    assert (lts.weight_bits, lts.activation_bits, lts.first_layer_bits, lts.last_layer_bits) == (
        3,
        3,
        None,
        8,
    )
    assert lts.modules_to_not_convert == ["classifier"]
    assert (training.learning_rate, training.num_train_epochs, training.output_dir) == (0.5, 7, "o")


def test_no_config_is_the_demo_recipe():
    model, data, lts, training = parse_train_args([])
    parsed = {**vars(model), **vars(data), **lts.to_dict(), **training.to_dict()}
    expected = {**DEMO_RECIPE, "report_to": []}  # TrainingArguments turns "none" into []
    assert {name: parsed[name] for name in expected} == expected


def test_tiny_training_run_writes_the_model_results_and_card_then_evaluates(tmp_path, capsys):
    common = ["--max_eval_samples", "60", "--image_size", "16"]
    argv = [
        "train",
        *common,
        "--max_train_samples",
        "96",
        "--num_train_epochs",
        "2",
        "--disable_tqdm",
        "true",
    ]
    assert main([*argv, "--config_overrides", TINY_MODEL, "--output_dir", "out"]) == 0
    out = tmp_path / "out"

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lts"
    assert config["quantization_config"]["weight_bits"] == 4
    assert config["id2label"] == {str(i): str(i) for i in range(10)} and config["image_size"] == 16
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= results["eval_top5_accuracy"] <= 1
    summary = capsys.readouterr().out
    for row in (
        "eval accuracy",
        "frozen weights",
        "weight updates saved",
        "backward FLOPs saved",
        "wall time",
    ):
        assert row in summary

    # The packed export, loaded back, scores what the trained model scored (the input size from its config).
    assert main(["eval", "--model", "out", "--dataset", "digits", *common[:2]]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n") :])["eval_accuracy"] == results["eval_accuracy"]


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    """``hf-lts train`` with no arguments: ≤ 3 minutes on two CPU cores, eval accuracy ≥ 0.90."""
    start = time.perf_counter()
    assert main(["train"]) == 0
    seconds = time.perf_counter() - start
    results = json.loads((tmp_path / "lts-output" / "eval_results.json").read_text())
    assert results["eval_accuracy"] >= 0.90
    assert seconds < 180
    assert "weight updates saved" in capsys.readouterr().out
