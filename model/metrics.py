"""Evaluation metrics for the NSAID-response classifier (Wei et al., iScience 2023).

Labels: 1 = responder (positive class), 0 = non-responder; scores are the
predicted probability of being a responder, and ``score >= cutoff`` predicts
a responder. The AUC confidence interval uses DeLong et al. (1988), computed
with the midrank algorithm of Sun & Xu (2014), ties counting 1/2.

The paper's Table 2 reports accuracy 0.78 with recall 0.77, precision 0.78 and
F1 0.78 on 23 test patients; a support-weighted recall always equals accuracy,
so those figures are macro averages over the two classes. ``recall``,
``precision`` and ``f1`` here are therefore macro averages, and the per-class
figures are kept as ``sensitivity``/``specificity`` and ``ppv``/``npv``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import norm, rankdata


@dataclass(frozen=True)
class BinaryMetrics:
    """Everything Table 2 of the paper reports, plus the raw confusion counts."""

    n: int
    positives: int
    negatives: int
    auc: float
    auc_ci_low: float
    auc_ci_high: float
    auc_se: float
    cutoff: float
    accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    recall: float
    precision: float
    f1: float
    plr: float
    nlr: float
    tp: int
    fp: int
    tn: int
    fn: int
    ci_level: float = 0.95

    def to_json(self) -> dict:
        """All fields as plain JSON values; NaN and infinities become None."""
        out: dict = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[key] = value
        return out


def _validate(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as 1-D numpy, or ValueError: a bad input must never give a number."""
    y = np.asarray(labels)
    try:
        s = np.asarray(scores, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be numeric: {exc}") from None
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError("labels and scores must be one-dimensional")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} != {s.shape[0]}")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-responder) or 1 (responder)")
    if not np.isfinite(s).all():
        raise ValueError("scores must all be finite")
    y = y.astype(np.int64)
    if y.sum() == 0 or y.sum() == y.shape[0]:
        raise ValueError("both classes must be present: the AUC is undefined for one class")
    return y, s


def delong_auc_variance(labels, scores) -> tuple[float, float]:
    """(AUC, DeLong variance), via midranks (Sun & Xu 2014); ties count 1/2.

    With a single case in a class, that class's sample variance is undefined and
    the variance is NaN rather than a misleading zero.
    """
    y, s = _validate(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    tz = rankdata(np.concatenate([pos, neg]))  # midranks in the pooled sample
    tx, ty = rankdata(pos), rankdata(neg)
    v10 = (tz[:m] - tx) / n  # per responder: share of non-responders scored below
    v01 = 1.0 - (tz[m:] - ty) / m  # per non-responder: share of responders above
    auc = float(v10.mean())
    if m < 2 or n < 2:
        return auc, math.nan
    var = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    return auc, var


def delong_ci(labels, scores, alpha: float = 0.05) -> tuple[float, float, float]:
    """(auc, low, high): the normal-approximation interval, clipped to [0, 1]."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    auc, var = delong_auc_variance(labels, scores)
    half = float(norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(var)
    return auc, float(np.clip(auc - half, 0.0, 1.0)), float(np.clip(auc + half, 0.0, 1.0))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, thresholds descending from +inf."""
    y, s = _validate(labels, scores)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    return fp / neg.size, tp / pos.size, thresholds


def youden_cutoff(labels, scores) -> float:
    """The threshold maximising sensitivity + specificity - 1; ties go to the larger one."""
    y, s = _validate(labels, scores)
    thresholds = np.unique(s)[::-1]
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    # J * m * n in integers, so equal J values compare equal exactly.
    j = tp * neg.size - fp * pos.size
    return float(thresholds[int(np.argmax(j))])  # argmax takes the first, i.e. largest


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _likelihood_ratio(num: float, den: float) -> float:
    """A likelihood ratio: inf on a zero denominator, NaN when both are zero."""
    if den == 0:
        return math.inf if num > 0 else math.nan
    return num / den


def youden_midpoint(labels, scores) -> float:
    """Midpoint of the interval of thresholds that all reach Youden's maximum.

    `youden_cutoff` returns the interval's upper end (a held-out score itself),
    which a new responder scoring a hair lower would fall below; the midpoint
    has the same sensitivity and specificity on the set it was chosen on.
    """
    upper = float(youden_cutoff(labels, scores))
    below = [float(s) for s in scores if s < upper]
    return (upper + max(below)) / 2 if below else upper


def binary_metrics(labels, scores, cutoff: float | None = None, alpha: float = 0.05) -> BinaryMetrics:
    """All reported metrics at one cutoff (the Youden cutoff when none is given)."""
    y, s = _validate(labels, scores)
    if cutoff is None:
        cutoff = youden_cutoff(y, s)
    cutoff = float(cutoff)
    if math.isnan(cutoff):
        raise ValueError("cutoff must not be NaN")
    return _metrics_of(y, s, s >= cutoff, cutoff, alpha)


def binary_metrics_per_row_cutoff(labels, scores, cutoffs, alpha: float = 0.05) -> BinaryMetrics:
    """Metrics where each row is labelled at its own cutoff (pooled out-of-fold predictions,
    each at its fold's validation cutoff); the AUC is that of the pooled scores. `cutoff` is
    NaN in the result: there is no single one."""
    y, s = _validate(labels, scores)
    c = np.asarray(cutoffs, dtype=float)
    if c.shape != s.shape or not np.isfinite(c).all():
        raise ValueError("cutoffs must be finite, one per score")
    return _metrics_of(y, s, s >= c, math.nan, alpha)


def _metrics_of(y: np.ndarray, s: np.ndarray, pred: np.ndarray, cutoff: float, alpha: float) -> BinaryMetrics:
    auc, low, high = delong_ci(y, s, alpha)
    _, var = delong_auc_variance(y, s)
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    ppv, npv = _ratio(tp, tp + fp), _ratio(tn, tn + fn)
    # Per-class F1 as 2TP/(2TP+FP+FN): defined even when a precision is not.
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    return BinaryMetrics(
        n=int(y.size), positives=tp + fn, negatives=tn + fp,
        auc=auc, auc_ci_low=low, auc_ci_high=high, auc_se=math.sqrt(var),
        cutoff=cutoff, accuracy=(tp + tn) / y.size,
        sensitivity=sens, specificity=spec, ppv=ppv, npv=npv,
        recall=(sens + spec) / 2, precision=(ppv + npv) / 2, f1=(f1_pos + f1_neg) / 2,
        plr=_likelihood_ratio(sens, 1 - spec), nlr=_likelihood_ratio(1 - sens, spec),
        tp=tp, fp=fp, tn=tn, fn=fn, ci_level=1.0 - alpha,
    )


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2f}"


def format_table(metrics: BinaryMetrics, title: str = "", cutoff_text: str | None = None) -> str:
    """A plain-text table in the layout of the paper's Table 2, two decimals.

    `cutoff_text` replaces the cutoff's value (e.g. "each fold's own").
    """
    m = metrics
    level = f"{m.ci_level * 100:g}%"
    rows = [
        (f"AUC ({level} CI)", f"{_fmt(m.auc)} ({_fmt(m.auc_ci_low)}-{_fmt(m.auc_ci_high)})"),
        ("Accuracy", _fmt(m.accuracy)),
        ("Recall (macro)", _fmt(m.recall)),
        ("Precision (macro)", _fmt(m.precision)),
        ("F1 (macro)", _fmt(m.f1)),
        ("PLR", _fmt(m.plr)),
        ("NLR", _fmt(m.nlr)),
        ("Cutoff", cutoff_text or _fmt(m.cutoff)),
        ("Sensitivity", _fmt(m.sensitivity)),
        ("Specificity", _fmt(m.specificity)),
        ("PPV", _fmt(m.ppv)),
        ("NPV", _fmt(m.npv)),
        ("TP / FP / TN / FN", f"{m.tp} / {m.fp} / {m.tn} / {m.fn}"),
        ("N (responders / non-responders)", f"{m.n} ({m.positives} / {m.negatives})"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [title] if title else []
    lines.append(f"{'Metric':<{width}}  Value")
    lines.append("-" * (width + 2 + max(len(v) for _, v in rows)))
    lines.extend(f"{name:<{width}}  {value}" for name, value in rows)
    return "\n".join(lines)


def plot_roc(labels, scores, path, title: str = "ROC", *, cutoff: float | None = None,
             operating_point: BinaryMetrics | None = None, point_label: str | None = None) -> None:
    """Write the ROC curve as a PNG, with the AUC, its CI and the cutoff point marked.

    `operating_point` marks metrics computed elsewhere (e.g. each row at its
    own fold's cutoff) instead of those at `cutoff`.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fpr, tpr, _ = roc_curve(labels, scores)
    met = operating_point or binary_metrics(labels, scores, cutoff=cutoff)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Chance")
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=(
        f"AUC = {_fmt(met.auc)} ({met.ci_level * 100:g}% CI "
        f"{_fmt(met.auc_ci_low)}-{_fmt(met.auc_ci_high)})"))
    ax.plot([1 - met.specificity], [met.sensitivity], marker="o", color="tab:red",
            linestyle="none", label=point_label or f"Cutoff {_fmt(met.cutoff)}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - Specificity", ylabel="Sensitivity", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    fig.savefig(Path(path), format="png")


def brier_score(labels, probabilities) -> float:
    """Mean squared difference between the responder probability and the outcome (0 is perfect)."""
    y, p = _validate_probabilities(labels, probabilities)
    return float(np.mean((p - y) ** 2))


def _validate_probabilities(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=float)
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise ValueError("labels and probabilities must be one-dimensional, non-empty and of equal length")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-responder) or 1 (responder)")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie within 0..1")
    return y.astype(float), p


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-count bin of the reliability diagram."""

    n: int
    mean_probability: float
    observed_fraction: float
    low: float
    high: float


@dataclass(frozen=True)
class Calibration:
    """Brier score, the Brier score of always predicting the prevalence (the bar to beat) and bins."""

    n: int
    brier: float
    brier_prevalence: float
    prevalence: float
    bins: tuple[ReliabilityBin, ...]

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "brier": round(self.brier, 6),
            "brier_prevalence_predictor": round(self.brier_prevalence, 6),
            "prevalence": round(self.prevalence, 6),
            "reliability_bins": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(b).items()}
                                 for b in self.bins],
            "bins": "equal-count bins of the sorted probabilities",
        }


def calibration(labels, probabilities, n_bins: int | None = None) -> Calibration:
    """Calibration summary; by default about five rows per bin, at most ten bins.

    Equal-count bins (not equal-width): with tens of rows, fixed-width bins
    leave most of them empty and a few holding everything.
    """
    y, p = _validate_probabilities(labels, probabilities)
    if n_bins is None:
        n_bins = max(1, min(10, y.size // 5))
    n_bins = max(1, min(int(n_bins), y.size))
    order = np.argsort(p, kind="stable")
    bins = tuple(
        ReliabilityBin(n=int(idx.size), mean_probability=float(p[idx].mean()), observed_fraction=float(y[idx].mean()),
                       low=float(p[idx].min()), high=float(p[idx].max()))
        for idx in np.array_split(order, n_bins)
    )
    prevalence = float(y.mean())
    return Calibration(n=int(y.size), brier=float(np.mean((p - y) ** 2)),
                       brier_prevalence=prevalence * (1 - prevalence), prevalence=prevalence, bins=bins)


def plot_reliability(cal: Calibration, path, title: str = "Reliability") -> None:
    """Observed responder fraction against mean predicted probability per bin, counts written beside."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Perfect calibration")
    xs = [b.mean_probability for b in cal.bins]
    ys = [b.observed_fraction for b in cal.bins]
    ax.plot(xs, ys, marker="o", color="tab:blue", label=(
        f"Brier {cal.brier:.3f} (prevalence predictor {cal.brier_prevalence:.3f})"))
    for b in cal.bins:
        ax.annotate(f"n={b.n}", (b.mean_probability, b.observed_fraction), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="Mean predicted probability of response",
           ylabel="Observed fraction of responders", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    fig.savefig(Path(path), format="png")
