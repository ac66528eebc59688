"""The ``hf-lts`` command line: recipes and overrides, a tiny training run, evaluation, user errors."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import datasets
import pytest
import torch
from helpers.ports import free_port
from safetensors.torch import load_file

import hf_lts
from hf_lts.cli import main
from hf_lts.commands.common import build_model
from hf_lts.commands.recipes import DEMO_RECIPE, parse_train_args, train_parser

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}'
#: A few optimizer steps of a tiny model on a few digits: what the repeatability tests run.
TINY_RUN = [
    "train", "--config_overrides", TINY_MODEL, "--image_size", "16", "--max_train_samples", "64",
    "--max_eval_samples", "32", "--max_steps", "3", "--per_device_train_batch_size", "16",
    "--eval_strategy", "no", "--disable_tqdm", "true", "--hflip", "true",
]  # fmt: skip


def _labels(n: int = 10) -> tuple[dict[int, str], dict[str, int]]:
    return {i: str(i) for i in range(n)}, {str(i): i for i in range(n)}


def _env() -> dict[str, str]:
    """Subprocesses import this checkout's hf_lts, not whatever is installed."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


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
    """``hf-lts train`` with no arguments: eval accuracy ≥ 0.90 (its time is the README's to state)."""
    assert main(["train"]) == 0
    results = json.loads((tmp_path / "lts-output" / "eval_results.json").read_text())
    assert results["eval_accuracy"] >= 0.90
    assert "weight updates saved" in capsys.readouterr().out


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


def test_the_same_command_gives_bit_identical_weights_in_two_processes(tmp_path):
    """``torchrun --nproc_per_node 2 -m hf_lts.cli train ...`` twice (gloo on CPU), with full_determinism."""
    for out in ("a", "b"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", free_port(), "-m", "hf_lts.cli", *TINY_RUN,
               "--full_determinism", "true", "--output_dir", out]  # fmt: skip
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_identical(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


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
