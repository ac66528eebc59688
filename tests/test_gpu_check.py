"""The GPU check script must keep running: a CPU smoke run on a tiny model, through the GPU's compiled path."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--device",
        "cpu",
        "--image-size",
        "16",
        "--batch",
        "2",
    ]
    cmd += ["--steps", "1", "--tiny", "--models", "resnet18", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_LTS_BACKEND": "compiled"}
    proc = subprocess.run(
        cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| resnet18 | bf16 | lts-100% |" in proc.stdout  # the table
    result = json.loads(out.read_text())
    assert result["backends"] == {"cpu/float32": "compiled"}
    for check in ("frozen_exact", "frozen_grads_zero", "full_layer_grad_skipped", "compiled_equals_eager"):
        assert result[check] is True, check
    timings = result["timings"]
    assert set(timings) == {f"resnet18/{p}/{v}" for p in ("fp32", "bf16") for v in
                            ("fp32", "qat", "lts", "lts-freezing", "lts-90%", "lts-90%-channels", "lts-100%")}  # fmt: skip
    assert all("error" not in row and row["recompiles"] == 0 for row in timings.values()), timings
    assert timings["resnet18/fp32/lts-100%"]["frozen_ratio"] == 1.0
    assert 0 < timings["resnet18/fp32/lts-freezing"]["frozen_ratio"] <= 1


@pytest.mark.slow
def test_ddp_check_runs_on_two_cpu_processes():
    """The GPU check's 2-process part, over gloo: both ranks and both hook settings end in one state."""
    from benchmarks.gpu_check import ddp_check

    result = ddp_check(argparse.Namespace(device="cpu", tiny=True))
    assert result["ddp_ranks_identical"] and result["ddp_hook_identical"], result
    assert result["ddp_frozen_ratio"] > 0.5 and result["ddp_hook_bytes_share"] < 1.0
