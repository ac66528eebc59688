"""Smoke test of the accuracy harness (``python -m benchmarks.accuracy --smoke``): a few steps on digits.

It checks the grid and the records, not accuracy: a handful of steps trains nothing.
"""

import json

from transformers import TrainingArguments, ViTForImageClassification

from benchmarks import accuracy, common

FIELDS = {
    "model",
    "weight_bits",
    "activation_bits",
    "method",
    "seed",
    "top1",
    "top5",
    "frozen_ratio",
    "weight_updates_saved",
    "backward_flops_saved",
    "wall_seconds",
    "frozen_history",
}


def test_smoke_grid_writes_records_a_report_and_plots(tmp_path):
    output = tmp_path / "records.json"
    argv = ["--smoke", "--bits", "2", "--seeds", "0", "--output", str(output), "--results-dir", str(tmp_path)]
    assert accuracy.main(argv) == 0

    records = json.loads(output.read_text())
    grid = {(r["model"], r["method"], r["weight_bits"]) for r in records}
    expected = {(m, "fp", 32) for m in accuracy.DEFAULT_MODELS}
    expected |= {(m, method, 2) for m in accuracy.DEFAULT_MODELS for method in ("qat", "lts")}
    assert grid == expected and len(records) == len(expected)
    for r in records:
        assert FIELDS <= r.keys()
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["wall_seconds"] > 0
        assert r["activation_bits"] == r["weight_bits"] and r["seed"] == 0
        if r["method"] == "lts":  # logged every step of the 5; the last step (r = 1) freezes in-range weights
            assert [step for step, _ in r["frozen_history"]] == [1, 2, 3, 4, 5]
            assert r["frozen_ratio"] > 0.5 and 0 < r["weight_updates_saved"] < r["frozen_ratio"]
        else:
            assert r["frozen_ratio"] == r["weight_updates_saved"] == r["backward_flops_saved"] == 0.0
        if r["method"] == "qat":
            assert r["frozen_history"] and all(ratio == 0 for _, ratio in r["frozen_history"])

    for name in ("accuracy_smoke.md", "accuracy_smoke_top1.png", "accuracy_smoke_frozen.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = (tmp_path / "accuracy_smoke.md").read_text()
    assert "| resnet18 | 2/2 | lts |" in report and "(accuracy_smoke_top1.png)" in report

    # rebuilding from the records rewrites the same report without training
    (tmp_path / "accuracy_smoke.md").unlink()
    assert accuracy.main(["--from-json", str(output), "--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "accuracy_smoke.md").read_text() == report


def test_vit_smoke_run_trains_with_its_own_settings_and_targets(tmp_path):
    """``--models vit``: AdamW, 4x the fp32 steps, its own targets, a report of its own name."""
    output = tmp_path / "vit.json"
    argv = ["--smoke", "--models", "vit", "--bits", "4", "--seeds", "0", "--output", str(output)]
    assert accuracy.main([*argv, "--results-dir", str(tmp_path)]) == 0
    records = json.loads(output.read_text())
    assert [(r["model"], r["method"], r["weight_bits"]) for r in records] == [
        ("vit", "fp", 32),
        ("vit", "qat", 4),
        ("vit", "lts", 4),
    ]
    smoke = common.BUDGETS["smoke"]
    assert all(r["budget"]["fp_steps"] == 4 * smoke.fp_steps for r in records)
    assert records[2]["frozen_ratio"] > 0.5  # the smoke run's last step freezes in-range weights
    report = (tmp_path / "accuracy_vit_smoke.md").read_text()
    assert "| vit | 4/4 | lts |" in report and "W4A4 top-1 LTS ≥ QAT − seed spread" in report
    assert "The ViT trains with AdamW" in report and "(accuracy_vit_smoke_top1.png)" in report

    args = common.training_args(TrainingArguments, str(tmp_path), smoke, 0, quantized=True, model="vit")
    assert (args.optim, args.learning_rate, args.warmup_steps) == ("adamw_torch", 1e-4, 0.1)
    assert isinstance(common.build_model("small-vit", 16), ViTForImageClassification)  # the speed harness's
