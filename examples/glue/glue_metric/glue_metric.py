"""GLUE metrics as a local ``evaluate`` module: loads by path, so it runs with or without network.

Example:
    >>> import evaluate
    >>> metric = evaluate.load("examples/glue/glue_metric", config_name="mrpc")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_DESCRIPTION = """\
The metrics of the GLUE benchmark (https://gluebenchmark.com): Matthews correlation for CoLA, accuracy and F1 for
MRPC and QQP, Pearson and Spearman correlation for STS-B, accuracy for the other tasks. Two configurations serve
local tasks: "classification" (accuracy and macro-averaged F1) and "regression" (as STS-B).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (class ids; floats for "stsb" and "regression").
    references: gold labels, same type.
Returns: a dict with the configuration's metrics, among "accuracy", "f1", "matthews_correlation", "pearson",
    "spearmanr".
"""

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans", "ax")
CONFIG_NAMES = ("cola", "mrpc", "qqp", "stsb", *ACCURACY_TASKS, "classification", "regression")
REGRESSION_CONFIGS = ("stsb", "regression")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIG_NAMES:
            raise KeyError(f"Unknown GLUE metric configuration {self.config_name!r}; choose one of {CONFIG_NAMES}.")
        dtype = "float32" if self.config_name in REGRESSION_CONFIGS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        name = self.config_name
        if name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if name in REGRESSION_CONFIGS:
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        accuracy = float(accuracy_score(references, predictions))
        if name in ("mrpc", "qqp"):
            return {"accuracy": accuracy, "f1": float(f1_score(references, predictions))}
        if name == "classification":
            return {"accuracy": accuracy, "f1": float(f1_score(references, predictions, average="macro"))}
        return {"accuracy": accuracy}
