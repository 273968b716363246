"""Perplexity from per-token negative log-likelihoods: exp(mean NLL).

The Hub's perplexity module loads a model by name to score text; the recipes already have the model's
token losses, so this module only aggregates them, and works offline (loaded by path).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "exp of the mean per-token negative log-likelihood."
_INPUTS = "losses: per-token negative log-likelihoods (natural log)."


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"losses": datasets.Value("float64")}),
        )

    def _compute(self, losses):
        losses = np.asarray(losses, dtype=np.float64)
        mean = float(losses.mean()) if losses.size else float("nan")
        return {"perplexity": float(np.exp(mean)), "mean_nll": mean, "tokens": int(losses.size)}
