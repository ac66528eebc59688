"""Smoke test of the speed harness (``python -m benchmarks.speed --quick``) on a tiny model."""

import json

import pytest

from benchmarks import speed


@pytest.mark.slow  # (the default suite's time)
def test_speed_harness_quick_run_writes_every_field(tmp_path):
    output = tmp_path / "speed.json"
    variants = ["fp32", "qat", "lts-real-70", "lts-all-100"]
    speed.main(
        [
            "--quick",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--variants",
            *variants,
            "--output",
            str(output),
            "--memory-variants",
            "qat",
            "lts-all-100",
        ]
    )
    results = json.loads(output.read_text())
    assert results["command"].startswith("python -m benchmarks.speed --quick")
    tiny = results["models"]["tiny"]
    assert tiny["mask_run"]["steps"] == 12 and tiny["mask_run"]["data"] in ("fashion-mnist", "digits")
    rows = tiny["variants"]
    assert list(rows) == variants
    for name, row in rows.items():
        assert row["step_ms"] > 0 and len(row["step_ms_all"]) == 2, name
        assert row["backward_flops"] > 0, name
        assert {"step_vs_fp32", "step_vs_qat", "backward_flops_saved_measured"} <= row.keys(), name
    assert rows["qat"]["step_vs_qat"] == 1.0 and rows["qat"]["backward_flops_saved_measured"] == 0.0
    assert rows["lts-real-70"]["state_bytes_per_weight"] == 4.0
    assert 0.6 < rows["lts-real-70"]["frozen_ratio"] < 0.8
    for name in ("qat", "lts-all-100"):  # one fresh subprocess each
        assert rows[name]["peak_rss_mb"] > 0 and rows[name]["training_mb"] > 0, name
    assert "training_memory_vs_qat" in rows["lts-all-100"] and "peak_rss_mb" not in rows["fp32"]
    everything = rows["lts-all-100"]
    assert everything["frozen_ratio"] == 1.0
    # nothing computes a weight gradient: the backward saves exactly the counted half of conv/linear FLOPs
    assert (
        abs(everything["backward_flops_saved_measured"] - everything["backward_flops_saved_counted"]) < 0.01
    )


@pytest.mark.slow  # (two whole LTSTrainer runs: the default suite's time)
def test_timing_harness_runs_qat_and_lts_back_to_back(tmp_path):
    """``python -m benchmarks.timing`` on a few steps: one fresh process per run, ratios to QAT's."""
    from benchmarks import timing

    output = tmp_path / "timing.json"
    args = ["--models", "small-resnet18", "--variants", "qat", "lts-completion", "--steps", "4"]
    timing.main([*args, "--threads", "1", "--rounds", "2", "--output", str(output)])
    result = json.loads(output.read_text())
    qat, lts = result["records"]
    assert (qat["variant"], lts["variant"]) == ("qat", "lts-completion") and qat["steps"] == 4
    assert len(qat["wall_seconds_all"]) == 2 and qat["wall_seconds"] == min(qat["wall_seconds_all"]) > 0
    assert qat["frozen_ratio"] == 0 and lts["options"]["channel_completion"] == 0.9
    assert 0 <= lts["backward_flops_saved_realised"] <= lts["backward_flops_saved"] + 1e-9
    assert len(lts["step_seconds"]) == 4 and 0 < sum(lts["step_seconds"]) < lts["wall_seconds"]
    table = timing.markdown(result["records"])
    assert table.count("| small-resnet18 |") == 2 and "| 1.00 / 1.00 / 1.00 / 1.00 |" in table

    timing.main([*args, "--paired", "--output", str(output)])  # QAT and LTS at the same time
    qat, lts = json.loads(output.read_text())["records"]
    assert (qat["variant"], lts["variant"]) == ("qat", "lts-completion")
    assert lts["paired_qat_seconds"] == qat["wall_seconds"] > 0


def test_stragglers_harness_times_every_layer_both_ways(tmp_path):
    from benchmarks import stragglers

    output = tmp_path / "stragglers.json"
    argv = ["--model", "tiny", "--image-size", "16", "--batch-size", "4", "--shares", "0.01", "0.5"]
    results = stragglers.main([*argv, "--repeats", "1", "--threads", "1", "--output", str(output)])
    assert json.loads(output.read_text())["totals"] == results["totals"]
    assert len(results["layers"]) > 3
    for row in results["layers"]:
        for share, cell in row["shares"].items():
            assert cell["dense_ms"] > 0 and cell["chosen_ms"] > 0, (row["layer"], share)
    assert any(row["shares"]["0.01"]["stragglers"] for row in results["layers"])  # both paths were timed
    assert set(results["totals"]) == {"0.01", "0.5"}


def test_phases_harness_records_every_step_of_both_runs(tmp_path):
    from benchmarks import phases

    output = tmp_path / "phases.json"
    argv = ["--model", "tiny", "--image-size", "16", "--batch-size", "4", "--steps", "24", "--phases", "4"]
    steps = phases.main([*argv, "--threads", "1", "--output", str(output)])
    assert len(steps) == 24 and json.loads(output.read_text())["steps"] == steps
    assert all(r["qat"] > 0 and r["lts"] > 0 for r in steps)
    frozen = [r["frozen"] for r in steps]
    assert frozen == sorted(frozen) and frozen[-1] > 0.5  # freezing is permanent and happens in 24 steps
    assert steps[0]["skipped"] == 0.0
