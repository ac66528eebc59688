"""README.md runs as printed: every ``hf-lts`` command of its bash blocks, and every Python block.

Commands are found, not listed here, so a command added to the README later is tested too. What the tests
change, and why (nothing else is touched):

- train commands get ``--max_steps 2 --max_eval_samples 64`` appended: the README's runs take minutes to
  days, the tests check that each one starts, trains, saves and evaluates;
- ``--data_dir`` with small Fashion-MNIST-format idx files is appended where the command reads
  ``fashion_mnist`` and the Debian package ``dataset-fashion-mnist`` is not installed;
- in the Python blocks, the Hub model ``microsoft/resnet-18`` is a tiny local ResNet saved by the test,
  ``num_train_epochs=30`` is ``max_steps=2``, and the Hub user ``me`` is the local Hub's user;
- the Hub is the local server of ``tests/helpers/hub_server.py`` (fixture ``hub_server``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import tiny_resnet

from hf_lts.data import FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
STEP_LIMIT = ["--max_steps", "2", "--max_eval_samples", "64"]


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def readme_commands() -> list[list[str]]:
    """Every line of a bash block that runs ``hf-lts``, as argv (comments dropped)."""
    return [
        shlex.split(line, comments=True)
        for block in code_blocks("bash")
        for line in block.splitlines()
        if line.startswith("hf-lts ")
    ]


def write_small_fashion_mnist(folder: Path) -> None:
    """The four idx files of Fashion-MNIST (train 256, test 64 images of 28×28), random content."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, n in (("train", 256), ("t10k", 64)):
        for kind, shape in (("images-idx3-ubyte", (n, 28, 28)), ("labels-idx1-ubyte", (n,))):
            data = rng.integers(0, 256 if kind.startswith("images") else 10, shape, dtype=np.uint8)
            header = bytes([0, 0, 8, len(shape)]) + np.array(shape, ">u4").tobytes()
            (folder / f"{prefix}-{kind}").write_bytes(header + data.tobytes())


def test_the_readme_lists_its_commands():
    commands = readme_commands()
    assert [c[:2] for c in commands].count(["hf-lts", "train"]) >= 3
    assert {c[1] for c in commands} >= {"train", "eval", "push"}


@pytest.mark.slow
def test_every_readme_command_runs_as_printed(hub_server, tmp_path):
    """In order, in one folder (``eval`` and ``push`` use what the demo wrote), as subprocesses of this
    checkout; each train command saves a model that trained for the step limit."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for argv in readme_commands():
        args = argv[1:]
        if args[0] == "train":
            args += STEP_LIMIT
            if "fashion_mnist" in args and not FASHION_MNIST_DIR.is_dir():
                write_small_fashion_mnist(tmp_path / "fashion-mnist")
                args += ["--data_dir", "fashion-mnist"]
        proc = subprocess.run(
            [sys.executable, "-m", "hf_lts.cli", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, (
            f"{shlex.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
        if args[0] == "train":
            output_dir = args[args.index("--output_dir") + 1] if "--output_dir" in args else "lts-output"
            state = (tmp_path / output_dir / "trainer_state.json").read_text()
            assert '"global_step": 2' in state, shlex.join(argv)
            assert (tmp_path / output_dir / "README.md").is_file()
        if args[0] == "push":
            repo_id = args[args.index("--repo-id") + 1]
            assert "model.safetensors" in hub_server_files(repo_id)


def run_cli(cwd: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_lts.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"hf-lts {shlex.join(args)} failed:\n{proc.stderr[-3000:]}"


def hub_server_files(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo_id)


def test_every_readme_python_block_runs(hub_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_resnet(num_labels=5).save_pretrained(tmp_path / "resnet-18")
    substitutions = {
        '"microsoft/resnet-18"': repr(str(tmp_path / "resnet-18")),
        "num_train_epochs=30": "max_steps=2",
        '"me/': f'"{hub_server.user}/',
    }
    blocks = code_blocks("python")
    assert len(blocks) >= 2
    for old in substitutions:  # a README change that drops one must update this test, not download
        assert any(old in block for block in blocks), old
    threads = torch.get_num_threads()
    namespaces = []
    for i, block in enumerate(blocks):
        if "lts-output/model.onnx" in block:  # the bash block before it: the demo, then its ONNX export
            run_cli(tmp_path, "train", *STEP_LIMIT)
            run_cli(tmp_path, "export", "--format", "onnx", "lts-output")
        for old, new in substitutions.items():
            block = block.replace(old, new)
        namespace: dict = {"__name__": f"readme_block_{i}"}
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        namespaces.append(namespace)
    torch.set_num_threads(threads)

    api, plain = namespaces[0], namespaces[1]
    onnx = next(n for n in namespaces if "session" in n)  # the ONNX Runtime block ran the exported demo
    assert onnx["logits"].shape == (len(onnx["test"]["labels"]), 10)
    # The Trainer block: a trained export with its card, pushed, and loaded back from the Hub.
    assert {"config.json", "model.safetensors", "README.md"} <= set(
        os.listdir(tmp_path / "resnet18-w2a2-lts")
    )
    assert "## Evaluation" in (tmp_path / "resnet18-w2a2-lts" / "README.md").read_text()
    assert api["model"].lts_config.weight_bits == 2 and api["model"].config.num_labels == 10
    # The plain PyTorch block: the scratcher stepped once per optimizer step, the step sizes trained.
    stats = plain["scratcher"].stats()
    assert stats["step"] == plain["epochs"] * len(plain["loader"])
    assert any(
        "scale" in name
        for g in plain["optimizer"].param_groups
        for p in g["params"]
        for name, q in plain["model"].named_parameters()
        if q is p
    )
