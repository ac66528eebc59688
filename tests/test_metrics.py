"""hf_lts.metrics: the shipped top-1/top-5 accuracy module, loaded offline by path, and compute_metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_lts.metrics import compute_metrics, load_accuracy_metric


@pytest.fixture(scope="module")
def metric():
    return load_accuracy_metric()


def _topk_by_hand(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Stable descending sort: among equal logits the lower class index ranks first, as np.argmax picks."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean([label in row for row, label in zip(order, labels, strict=True)]))


def test_matches_numpy_on_random_logits(metric) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 20)).astype(np.float32)
    labels = rng.integers(0, 20, 300)
    logits[np.arange(0, 300, 3), labels[::3]] += 2.0  # some right answers, so top-1 is not ~chance only
    result = metric.compute(predictions=logits, references=labels)
    assert set(result) == {"accuracy", "top5_accuracy"}
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert result["top5_accuracy"] == pytest.approx(_topk_by_hand(logits, labels, 5))
    assert 0 < result["accuracy"] < result["top5_accuracy"] < 1


def test_ties_go_to_the_lower_class_index(metric) -> None:
    logits = np.array(
        [
            [1.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0],  # label 1 wins the tie with 2: top-1 right
            [1.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0],  # label 2 loses it: top-1 wrong, rank 1
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all equal, label 4: rank 4, inside top-5
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all equal, label 5: rank 5, outside top-5
        ]
    )
    labels = np.array([1, 2, 4, 5])
    result = metric.compute(predictions=logits, references=labels)
    assert result == {"accuracy": 0.25, "top5_accuracy": 0.75}
    assert result["accuracy"] == np.mean(logits.argmax(1) == labels)
    assert result["top5_accuracy"] == _topk_by_hand(logits, labels, 5)


def test_fewer_than_five_classes_is_top_k_of_all(metric) -> None:
    logits = np.array([[0.1, 2.0, 0.3], [1.0, 0.0, 0.5]])
    assert metric.compute(predictions=logits, references=[1, 2]) == {"accuracy": 0.5, "top5_accuracy": 1.0}


def test_rejects_bad_shapes_and_labels(metric) -> None:
    with pytest.raises(ValueError, match="class ids"):
        metric.compute(predictions=[[0.0, 1.0]], references=[2])


def test_compute_metrics_for_the_trainer() -> None:
    logits = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    labels = np.array([1, 1, 1])
    expected = {"accuracy": pytest.approx(2 / 3), "top5_accuracy": 1.0}
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == expected
    hidden = np.zeros((3, 4, 4))
    assert compute_metrics(EvalPrediction(predictions=(logits, hidden), label_ids=labels)) == expected


def test_loads_by_path_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process rather than in a subprocess with HF_HUB_OFFLINE=1 (importing evaluate alone takes ~5 s):
    every socket connection fails and the libraries' offline switches are on."""
    import socket

    import evaluate.config
    import huggingface_hub.constants

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("this test must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    metric = load_accuracy_metric()
    assert metric.compute(predictions=[[0.0, 1.0]], references=[1]) == {"accuracy": 1.0, "top5_accuracy": 1.0}


def test_trainer_reports_eval_accuracy_and_top5(tmp_path: Path) -> None:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

    from hf_lts.data import collate_fn, label_maps, load_image_dataset, prepare_dataset

    digits = load_image_dataset("digits")
    id2label, label2id = label_maps(digits)
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=10,
        id2label=id2label,
        label2id=label2id,
    )
    trainer = Trainer(
        model=ResNetForImageClassification(config),
        args=TrainingArguments(str(tmp_path), per_device_eval_batch_size=128, report_to=[], use_cpu=True),
        eval_dataset=prepare_dataset(digits["validation"].select(range(100)), 32, train=False),
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
    )
    results = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_top5_accuracy"} <= set(results)
    assert 0 <= results["eval_accuracy"] <= results["eval_top5_accuracy"] <= 1
