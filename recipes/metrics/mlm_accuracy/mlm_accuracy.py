"""Masked-LM accuracy: the fraction of masked positions whose prediction is the original token.

Shipped with the recipes and loaded by path (`evaluate.load("recipes/metrics/mlm_accuracy")`) so evaluation
never needs the Hugging Face Hub. Positions whose reference is -100 (not masked) are ignored.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy over masked positions (references equal to -100 are ignored)."
_INPUTS = "predictions: predicted token ids; references: original token ids, -100 where not masked."


class MlmAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        keep = references != -100
        total = int(keep.sum())
        correct = int((predictions[keep] == references[keep]).sum())
        return {"mlm_accuracy": correct / total if total else float("nan"), "masked_tokens": total}
