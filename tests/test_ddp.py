"""Multi-process training with real processes over gloo: `torchrun` and `accelerate launch --multi_gpu`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ports import free_port

WORKER = str(Path(__file__).parent / "helpers" / "ddp_worker.py")
REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def torchrun(*args: str) -> list[str]:
    flags = ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", free_port()]
    return [sys.executable, "-m", "torch.distributed.run", *flags, *args]


def accelerate(*args: str, config_file: Path | None = None) -> list[str]:
    """``accelerate launch --multi_gpu`` with 2 processes (on CPU: gloo), from flags or a config file."""
    if config_file is None:
        flags = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        flags = ["--config_file", str(config_file)]
    flags += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", free_port()]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, *args]


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """10 steps on 2 processes launched by Accelerate, with a checkpoint at step 5."""
    out = tmp_path_factory.mktemp("straight")
    run(accelerate(WORKER, "train", "--out", str(out), "--steps", "10", "--save-steps", "5"), REPO)
    return out


def test_every_rank_holds_the_same_model_and_lts_state(straight_run):
    r0, r1 = ranks(straight_run)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["digest"] == r1["digest"]  # weights, steps, levels, masks, distances: bit for bit
    assert r0["stats"] == r1["stats"] and r0["stats"]["step"] == 10
    assert 0 < r0["stats"]["frozen_ratio"] <= 1
    # Activation quantizers initialised from the global first batch: identical, not per rank.
    assert r0["activation_quantizers"] == r1["activation_quantizers"]
    assert any(signed for _, signed in r0["activation_quantizers"].values())
    # Only the main process writes checkpoints, and they hold the full training state.
    assert sorted(p.name for p in straight_run.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-10",
        "checkpoint-5",
    ]


def test_no_process_group_thread_outlives_the_exit_handler(straight_run):
    """The group's gloo threads are joined in hf-lts's ``atexit`` handler, not in the interpreter's
    teardown, where a thread that outlives the interpreter can abort the process (SIGABRT)."""
    for rank in (0, 1):
        threads = json.loads((straight_run / f"threads{rank}.json").read_text())
        assert threads  # the main thread at least: the record was written at exit
        assert [t for t in threads if "gloo" in t] == [], threads


def test_resume_under_ddp_is_exact(straight_run, tmp_path):
    checkpoint = straight_run / "checkpoint-5"
    run(torchrun(WORKER, "train", "--out", str(tmp_path), "--steps", "10", "--resume", str(checkpoint)), REPO)
    resumed = ranks(tmp_path)
    assert resumed[0]["digest"] == resumed[1]["digest"] == ranks(straight_run)[0]["digest"]


def test_skipping_frozen_weights_in_the_allreduce_is_bit_identical(straight_run, tmp_path):
    run(torchrun(WORKER, "train", "--out", str(tmp_path), "--steps", "10", "--default-allreduce"), REPO)
    default = ranks(tmp_path)
    assert default[0]["digest"] == default[1]["digest"] == ranks(straight_run)[0]["digest"]
    saved = [s for s in ranks(straight_run)[0]["allreduce_bytes_saved"] if s is not None]
    assert saved and saved[-1] > 0  # fully frozen tensors were left out once they appeared
    assert not any(default[0]["allreduce_bytes_saved"])


def test_global_batch_gradient_does_not_depend_on_the_number_of_processes(tmp_path):
    """2 processes × batch 4 must give the gradient of 1 process × batch 8 (the Trainer's world-size loss
    scaling for models taking ``**kwargs`` would double it)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, WORKER, "grad", "--out", str(one), "--steps", "1", "--batch", "8"], REPO)
    run(torchrun(WORKER, "grad", "--out", str(two), "--steps", "1", "--batch", "4"), REPO)
    g1 = torch.load(one / "grads.pt", weights_only=True)
    g2 = torch.load(two / "grads.pt", weights_only=True)
    assert g1.keys() == g2.keys() and any("weight_quantizer.scale" in k for k in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-8, msg=name)


def test_cli_trains_under_accelerate_launch_with_the_shipped_config(tmp_path):
    """The 1 node × 8 GPUs recipe, scaled to 2 processes (gloo on CPU), driving ``hf_lts.cli train``."""
    out = tmp_path / "cli"
    overrides = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}'
    cli = ["-m", "hf_lts.cli", "train", "--output_dir", str(out), "--max_steps", "4", "--eval_strategy", "no"]
    cli += ["--per_device_train_batch_size", "16", "--image_size", "16", "--config_overrides", overrides]
    run(accelerate(*cli, config_file=REPO / "recipes" / "accelerate" / "1node_8gpu.yaml"), tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lts"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_dead_rank_mid_checkpoint_fails_clearly_and_the_last_complete_checkpoint_resumes(
    straight_run, tmp_path
):
    """Rank 0 is SIGKILLed while it writes checkpoint-10. Started without a launcher (which would kill the
    survivor itself), rank 1 must exit with one clear line within ``ddp_timeout``, not hang; then a resume
    skips the partial checkpoint-10 and ends bit-identical to the uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", PYTHONPATH=str(REPO))
    cmd = [sys.executable, WORKER, "train", "--out", str(tmp_path), "--steps", "10", "--save-steps", "5"]
    cmd += ["--kill-at", "save:10", "--ddp-timeout", "60"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    assert procs[0].wait(timeout=300) == -9
    survivor_err = procs[1].communicate(timeout=90)[1]  # a hang times out here: ddp_timeout is 60 s
    assert procs[1].returncode == 1
    assert (
        "RuntimeError: Rank 1: another process of the run stopped responding" in survivor_err
        and f"the newest complete checkpoint is {tmp_path / 'checkpoint-5'}" in survivor_err
    ), survivor_err[-3000:]

    resume = torchrun(WORKER, "train", "--out", str(tmp_path), "--steps", "10", "--save-steps", "5")
    run([*resume, "--resume", "last"], REPO)
    resumed = ranks(tmp_path)
    assert resumed[0]["digest"] == resumed[1]["digest"] == ranks(straight_run)[0]["digest"]
    assert (tmp_path / "checkpoint-10" / "lts_checkpoint_complete.json").exists()
