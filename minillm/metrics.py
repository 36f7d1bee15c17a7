"""Evaluation metrics, the metrics log (JSONL + CSV, optional TensorBoard) and the curves plot.

Classification metrics are computed from a confusion matrix M (M[i, j] = examples of true
class i predicted as j). A confusion matrix is a sum over examples, so data-parallel ranks add
theirs with one all_reduce and every metric below stays exact.

    accuracy  = trace(M) / sum(M)
    F1_k      = 2 TP_k / (2 TP_k + FP_k + FN_k)          macro-F1 = mean over classes
    MCC       = (c s - t . p) / sqrt((s^2 - p . p)(s^2 - t . t))     (Gorodkin, 2004)
                c = trace(M), s = sum(M), t = row sums (true counts), p = column sums (predicted)

MCC is 0 when its denominator is 0 (one class only, in truth or prediction), as scikit-learn does.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch

IGNORE_INDEX = -100


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy), capped to stay finite for a diverged model."""
    return math.exp(min(mean_loss, 50.0))


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of positions (labels != ignore_index) where predictions == labels: MLM accuracy over
    the masked positions, NSP accuracy, classification accuracy."""
    keep = labels != ignore_index
    total = int(keep.sum())
    if total == 0:
        raise ValueError("accuracy: no labelled positions (every label is ignore_index)")
    return int((predictions[keep] == labels[keep]).sum()) / total


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    labels, predictions = labels.reshape(-1).long(), predictions.reshape(-1).long()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: labels must lie in [0, {num_classes})")
    flat = torch.bincount(labels * num_classes + predictions.clamp(0, num_classes - 1), minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)  # (K, K)


def f1_scores(matrix: torch.Tensor) -> torch.Tensor:
    """Per-class F1 from a confusion matrix; a class never true nor predicted scores 0."""
    m = matrix.double()
    tp = m.diagonal()
    fp = m.sum(0) - tp  # predicted k, truly something else
    fn = m.sum(1) - tp  # truly k, predicted something else
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))


def macro_f1(matrix: torch.Tensor) -> float:
    """Unweighted mean of the per-class F1 scores."""
    return float(f1_scores(matrix).mean())


def binary_f1(matrix: torch.Tensor, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's F1 for MRPC and QQP)."""
    return float(f1_scores(matrix)[positive])


def mcc(matrix: torch.Tensor) -> float:
    """Matthews correlation coefficient, multi-class form (module docstring)."""
    m = matrix.double()
    c, s = m.trace(), m.sum()
    t, p = m.sum(1), m.sum(0)
    denominator = math.sqrt(float((s * s - p @ p) * (s * s - t @ t)))
    return 0.0 if denominator == 0 else float(c * s - t @ p) / denominator


def classification_metrics(matrix: torch.Tensor) -> dict[str, float]:
    """accuracy, macro_f1, mcc (and f1 of class 1 for binary tasks) from a confusion matrix."""
    total = int(matrix.sum())
    if total == 0:
        raise ValueError("classification_metrics: empty confusion matrix")
    out = {"accuracy": float(matrix.trace()) / total, "macro_f1": macro_f1(matrix), "mcc": mcc(matrix)}
    if matrix.shape[0] == 2:
        out["f1"] = binary_f1(matrix)
    return out



def text_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (Papineni et al., 2002) and chrF (Popovic, 2015) of generated texts against one
    reference each, on sacrebleu's 0-100 scale with its default tokenisation, so the figures
    compare with published ones."""
    import sacrebleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"text_scores: got {len(hypotheses)} hypotheses for {len(references)} references "
                         f"(expected the same number, at least one)")
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}

# =============================================================================================
# The metrics log
# =============================================================================================


class MetricsLog:
    """One record per logged training step or evaluation, in ``metrics.jsonl`` and ``metrics.csv``.

    Each record is ``{"step": int, "kind": "train" | "eval", <metric>: float, ...}``. The CSV has
    the union of all columns seen so far and is rewritten (atomically) on every write, so a new
    metric never corrupts its header. With ``enabled=False`` (DDP ranks other than 0) nothing is
    written. TensorBoard scalars (``<kind>/<metric>``, in ``tensorboard/``) are written too when
    ``torch.utils.tensorboard`` imports (``pip install tensorboard``).
    """

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.dir = Path(out_dir)
        self.jsonl, self.csv = self.dir / "metrics.jsonl", self.dir / "metrics.csv"
        self.enabled = enabled
        self.records: list[dict] = []
        self.tensorboard = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.jsonl.exists():
            # Keep what the resumed checkpoint had seen; rows written after it are redone.
            lines = self.jsonl.read_text().splitlines()
            self.records = [r for r in (json.loads(x) for x in lines if x.strip()) if r["step"] <= resume_step]
        self._write_all()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        # Resumed: TensorBoard hides the old run's events from resume_step + 1 on, as the log does.
        purge_step = resume_step + 1 if resume_step is not None else None
        self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        record = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def _write_all(self) -> None:
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.jsonl)
        self._write_csv()

    def _write_csv(self) -> None:
        columns = ["step", "kind"]
        for record in self.records:
            columns += [k for k in record if k not in columns]
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.records)
        os.replace(tmp, self.csv)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(log_path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``."""
    path = Path(log_path)
    if not path.is_file():
        raise FileNotFoundError(f"read_metrics: no metrics log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Loss curves (train and validation) on the left, the other evaluation metrics on the right."""
    # A Figure made without pyplot draws to a file only: no window, and matplotlib's backend
    # (a notebook's inline figures, say) is left as the caller set it.
    from matplotlib.figure import Figure

    records = read_metrics(log_path)
    train = [r for r in records if r["kind"] == "train" and "loss" in r]
    evals = [r for r in records if r["kind"] == "eval"]
    other = sorted({k for r in evals for k in r} - {"step", "kind", "val_loss", "val_ppl", "mlm_loss", "nsp_loss"})

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_metric = fig.subplots(1, 2)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.8)
    for key in ("val_loss", "mlm_loss", "nsp_loss"):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax_loss.plot(*zip(*points), marker="o", label=key.replace("_", " "))
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_loss.legend()
    for key in other:
        points = [(r["step"], r[key]) for r in evals if key in r]
        ax_metric.plot(*zip(*points), marker="o", label=key)
    ax_metric.set(xlabel="step", title="Evaluation metrics")
    if other:
        ax_metric.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path

