"""Evaluation metrics for the Trainer, loaded from modules shipped in this package.

`evaluate.load("accuracy")` downloads a script from the Hugging Face Hub, which fails offline; loading the
module by path needs no network.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import evaluate
    from transformers import EvalPrediction

_ACCURACY_PATH = Path(__file__).parent / "accuracy"


def load_accuracy_metric() -> evaluate.EvaluationModule:
    """Load the top-1/top-5 accuracy metric by path; works offline.

    Kept in memory because the default on-disk cache writes Arrow files under ~/.cache at every evaluation.
    """
    import evaluate  # here, not at the top: importing evaluate pulls in transformers.pipelines (~4 s)

    return evaluate.load(str(_ACCURACY_PATH), keep_in_memory=True)


@functools.cache
def _accuracy_metric() -> evaluate.EvaluationModule:
    return load_accuracy_metric()


def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`Trainer(compute_metrics=...)`: top-1 and top-5 accuracy of the logits.

    The Trainer prefixes the keys, so evaluation results carry `eval_accuracy` and `eval_top5_accuracy`.
    """
    logits = eval_pred.predictions
    if isinstance(logits, (tuple, list)):  # models that also return hidden states put the logits first
        logits = logits[0]
    return _accuracy_metric().compute(
        predictions=np.asarray(logits), references=np.asarray(eval_pred.label_ids)
    )
