"""Faults: kills mid-step / mid-checkpoint / mid-export then resume, partial checkpoints never loaded, pushes
during training that upload only the export (and survive a failed upload), clean multi-process exits."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.hub_server import HubServer
from helpers.tiny_models import tiny_resnet
from huggingface_hub import HfApi
from safetensors import safe_open
from test_ddp import REPO, WORKER, accelerate, torchrun
from transformers import TrainerCallback

import hf_lts
from hf_lts.cli import main
from hf_lts.resilience import COMPLETE_MARKER, mark_checkpoint_complete, resolve_resume

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
SKIPPED = "Skipping incomplete checkpoint"


def worker(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, WORKER, "train", "--out", str(out), "--steps", "12", "--save-steps", "4", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def rank0(out: Path) -> dict:
    return json.loads((out / "rank0.json").read_text())


def test_killed_mid_step_mid_checkpoint_and_mid_export_then_resumed_equals_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert worker(straight).returncode == 0
    # SIGKILL during step 6 (after its backward, before its optimizer step): checkpoint-4 is the last.
    assert worker(killed, "--kill-at", "step:6").returncode == -9
    # Resume, then SIGKILL while checkpoint-8 is half written: a folder that looks like a checkpoint.
    second = worker(killed, "--resume", "last", "--kill-at", "save:8")
    assert second.returncode == -9 and SKIPPED not in second.stderr
    assert (killed / "checkpoint-8" / "model.safetensors").exists()
    assert not (killed / "checkpoint-8" / COMPLETE_MARKER).exists()
    # Resume skips the partial checkpoint-8 (and says so), then SIGKILL while the final export is written.
    third = worker(killed, "--resume", "last", "--kill-at", "export:12")
    assert third.returncode == -9
    assert f"{SKIPPED} {killed / 'checkpoint-8'}: no completion marker" in third.stderr
    # The last resume finds the complete checkpoint-12 and only writes the export again.
    last = worker(killed, "--resume", "last")
    assert last.returncode == 0, last.stderr[-3000:]
    assert "is the end of training (step 12 of max_steps=12)" in last.stderr
    assert rank0(killed)["digest"] == rank0(straight)["digest"]  # weights and LTS state, bit for bit
    assert rank0(killed)["stats"] == rank0(straight)["stats"]
    with safe_open(killed / "model.safetensors", "pt") as f:  # the export is whole again
        assert f.metadata()["lts_format"] == "packed-v1"


def test_resume_picks_the_newest_complete_checkpoint_and_refuses_a_partial_one(tmp_path, caplog):
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
        (folder / "optimizer.pt").write_bytes(b"y" * 50)
        mark_checkpoint_complete(folder, step)
    (tmp_path / "checkpoint-6" / "optimizer.pt").write_bytes(b"y" * 20)  # rewritten after it was marked
    (tmp_path / "checkpoint-8").mkdir()  # a save killed before its first file
    with caplog.at_level(logging.WARNING, logger="hf_lts.resilience"):
        assert resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")
        assert resolve_resume("last", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert f"{SKIPPED} {tmp_path / 'checkpoint-8'}: no completion marker" in caplog.text
    assert (
        f"{SKIPPED} {tmp_path / 'checkpoint-6'}: optimizer.pt has 20 bytes, the marker recorded 50"
        in caplog.text
    )
    with pytest.raises(ValueError, match=r"checkpoint-8: no completion marker .*resume_from_checkpoint=True"):
        resolve_resume(str(tmp_path / "checkpoint-8"), str(tmp_path))
    assert resolve_resume(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="holds no complete checkpoint-N folder"):
        resolve_resume(True, str(tmp_path / "checkpoint-8"))


def test_cli_resume_last_skips_a_partial_checkpoint(tmp_path, capsys):
    """``--resume_from_checkpoint last``: 24 digits, batch 8, so checkpoint-3 is an epoch boundary (exact
    resume with random augmentation); checkpoint-6 is left as a kill mid-save leaves it."""
    common = ["train", "--max_train_samples", "24", "--per_device_train_batch_size", "8", "--max_steps", "6"]
    common += [
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--eval_strategy",
        "no",
        "--image_size",
        "16",
        "--torch_num_threads",
        "1",
    ]
    common += ["--config_overrides", '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}']
    assert main([*common, "--output_dir", str(tmp_path / "a")]) == 0
    b = tmp_path / "b"
    b.mkdir()
    for step in (3, 6):
        subprocess.run(["cp", "-r", str(tmp_path / "a" / f"checkpoint-{step}"), str(b)], check=True)
    (b / "checkpoint-6" / COMPLETE_MARKER).unlink()
    (b / "checkpoint-6" / "optimizer.pt").unlink()
    assert main([*common, "--output_dir", str(b), "--resume_from_checkpoint", "last"]) == 0
    expected = safe_open(tmp_path / "a" / "model.safetensors", "pt")
    actual = safe_open(b / "model.safetensors", "pt")
    assert set(expected.keys()) == set(actual.keys())
    assert all(torch.equal(expected.get_tensor(k), actual.get_tensor(k)) for k in expected.keys())  # noqa: SIM118
    assert (b / "checkpoint-6" / COMPLETE_MARKER).exists()  # rewritten whole by the resumed run


class _FailSecondPush(TrainerCallback):
    """Waits for each push to finish at the next save, and makes the Hub refuse the push of step 4."""

    def __init__(self, trainer: hf_lts.LTSTrainer, server: HubServer) -> None:
        self.trainer, self.server = trainer, server

    def on_save(self, args, state, control, **kwargs):
        if self.trainer._checkpoint_push is not None:
            self.trainer._checkpoint_push.exception()  # wait for it, so that the test is deterministic
        self.server.fail_commit_status = 500 if state.global_step == 2 else None


def _push_run(tmp_path: Path, server: HubServer | None) -> hf_lts.LTSTrainer:
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % 5} for i in range(24)]
    args = hf_lts.LTSTrainingArguments(
        tmp_path,
        max_steps=6,
        per_device_train_batch_size=4,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        push_to_hub=server is not None,
        hub_strategy="checkpoint",
        hub_model_id="test-user/pushed-during-training",
        hub_token="hf_secret_token_in_the_arguments",
    )
    trainer = hf_lts.LTSTrainer(
        model=tiny_resnet(), args=args, lts_config=hf_lts.LTSConfig(weight_bits=2), train_dataset=data
    )
    if server is not None:
        trainer.add_callback(_FailSecondPush(trainer, server))
    trainer.train()
    if trainer._checkpoint_push is not None:
        trainer._checkpoint_push.exception()
    return trainer


def test_pushes_during_training_upload_only_the_export_and_a_failed_one_does_not_stop_the_run(
    hub_server: HubServer, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="hf_lts.resilience"):
        pushed = _push_run(tmp_path / "pushed", hub_server)
    plain = _push_run(tmp_path / "plain", None)
    # The failed push of step 4 was logged; training went on and ended exactly like a run without pushes.
    assert "Push to the Hub during training failed; training goes on" in caplog.text
    assert pushed.state.global_step == 6
    expected, actual = plain.model.state_dict(), pushed.model.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []

    repo = hub_server._repos["test-user/pushed-during-training"]
    pushes = [c for c in repo.commits.values() if c.files]
    assert len(pushes) == 2  # steps 2 and 6; step 4's commit was refused
    for commit in pushes:
        assert {"config.json", "model.safetensors", "README.md", "log_history.json"} <= set(commit.files)
        assert not any(
            name.endswith((".bin", ".pt", ".pth")) or "checkpoint" in name or name == "trainer_state.json"
            for name in commit.files
        ), sorted(commit.files)
        for name, file in commit.files.items():  # the token appears in no uploaded byte
            content = hub_server._blob_path(file.sha256).read_bytes()
            assert b"hf_secret_token_in_the_arguments" not in content, name
    head = HfApi().hf_hub_download("test-user/pushed-during-training", "model.safetensors")
    with safe_open(head, "pt") as f:
        assert f.metadata()["lts_format"] == "packed-v1"  # the packed export, not the training state
        assert json.loads(f.metadata()["lts_stats"])["step"] == 6
    history = json.loads(
        Path(HfApi().hf_hub_download("test-user/pushed-during-training", "log_history.json")).read_text()
    )
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert not any(p.name.startswith("_lts-push") for p in (tmp_path / "pushed").iterdir())  # staging removed


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["script", "cli"])
def test_twenty_consecutive_two_process_runs_exit_with_status_zero(tmp_path, launcher):
    """A user's script under torchrun (rank 0 exports while rank 1 may already be exiting: the pattern that
    aborted in the destructor of a live process group) and the CLI under ``accelerate launch``."""
    failures = []
    for i in range(20):
        out = tmp_path / str(i)
        if launcher == "script":
            cmd = torchrun(WORKER, "train", "--out", str(out), "--steps", "4")
        else:
            cli = [
                "-m",
                "hf_lts.cli",
                "train",
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--eval_strategy",
            ]
            cli += [
                "no",
                "--max_train_samples",
                "32",
                "--per_device_train_batch_size",
                "8",
                "--image_size",
                "16",
            ]
            cli += ["--config_overrides", '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}']
            cmd = accelerate(*cli)
        proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            failures.append((i, proc.returncode, proc.stderr[-1500:]))
    assert failures == []
