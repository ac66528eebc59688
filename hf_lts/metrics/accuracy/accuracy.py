"""Top-1 and top-5 accuracy from logits, as an `evaluate` metric module.

Shipped inside hf_lts and loaded by path, because `evaluate.load("accuracy")` fetches a script from the
Hugging Face Hub, which is not reachable offline, and because the Hub's accuracy metric takes class ids,
not the logits that top-k needs. This file must stay self-contained: `evaluate` copies it into its module
cache and imports it on its own.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 and top-5 accuracy of a classifier, computed from its logits (or any per-class scores).

A sample counts as correct at k when its reference class is among the k highest scores. Ties are broken
toward the lower class index, as `numpy.argmax` does: the rank of the reference class is the number of
classes scoring strictly higher plus the number of lower-indexed classes scoring the same. So top-1 equals
`mean(argmax(predictions, -1) == references)` and top-5 >= top-1 always. With fewer than 5 classes,
top-5 is top-k with k = the number of classes (and is then 1.0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or 2-D array): logits, shape (n_samples, n_classes).
    references (`list` of `int`): class ids, shape (n_samples,).
Returns:
    accuracy (`float`): top-1 accuracy, in [0, 1].
    top5_accuracy (`float`): top-5 accuracy, in [0, 1].
Examples:
    >>> metric = evaluate.load("path/to/hf_lts/metrics/accuracy")
    >>> metric.compute(predictions=[[0.1, 2.0, 0.3], [1.0, 0.0, 0.5]], references=[1, 2])
    {'accuracy': 0.5, 'top5_accuracy': 1.0}
"""

_CITATION = ""


class Accuracy(evaluate.Metric):
    """Top-1 and top-5 accuracy of logits against integer labels."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        logits = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions must be logits of shape (n_samples, n_classes) matching {labels.shape[0]} "
                f"references, got shape {logits.shape}"
            )
        if labels.size == 0:
            raise ValueError("cannot compute accuracy of zero samples")
        n_classes = logits.shape[1]
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(
                f"references must be class ids in [0, {n_classes}), got {labels.min()}..{labels.max()}"
            )
        target = logits[np.arange(labels.size), labels][:, None]
        lower_index = np.arange(n_classes)[None, :] < labels[:, None]
        rank = (logits > target).sum(axis=1) + ((logits == target) & lower_index).sum(axis=1)
        return {
            "accuracy": float(np.mean(rank < 1)),
            "top5_accuracy": float(np.mean(rank < min(5, n_classes))),
        }
