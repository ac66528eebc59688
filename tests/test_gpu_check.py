"""The GPU check script must keep running: a CPU smoke run with a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path


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
    cmd += ["--steps", "1", "--tiny", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["frozen_exact"] and result["frozen_grads_zero"] and result["full_layer_grad_skipped"]
    assert set(result["median_step_seconds"]) == {"fp32", "qat", "lts@0%", "lts@70%", "lts@100%"}
    assert result["ratios_to_qat"]["qat"] == 1.0
