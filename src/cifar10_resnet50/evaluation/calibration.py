"""Can the probabilities be believed, and how sure is an accuracy figure (issue 8)?

Scores on logits already computed (no model here): expected calibration error, negative log
likelihood, Brier score, the reliability diagram's bins, Wilson intervals for accuracies,
and temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BINS = 15  # Guo et al.'s choice, the usual one for ECE
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``correct / total`` (95 % by default): unlike
    the normal approximation it stays inside [0, 1] and is honest for small counts."""
    if total <= 0:
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Bin:
    lower: float  # confidence range (lower, upper]
    upper: float
    count: int
    confidence: float  # mean top-1 probability in the bin (0 when empty)
    accuracy: float  # fraction correct in the bin (0 when empty)


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[Bin]:
    """Top-1 confidence in ``bins`` equal-width bins: float [N,C] probabilities, int [N]."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 goes to bin 0
    index = (torch.bucketize(conf.double(), edges, right=False) - 1).clamp(0, bins - 1)
    out = []
    for i in range(bins):
        mask = index == i
        n = int(mask.sum())
        out.append(
            Bin(
                float(edges[i]),
                float(edges[i + 1]),
                n,
                float(conf.double()[mask].mean()) if n else 0.0,
                float(correct[mask].mean()) if n else 0.0,
            )
        )
    return out


def ece_of(bins: list[Bin]) -> float:
    """Expected calibration error from the bins: Σ_bins (n_b / N) · |accuracy_b − confidence_b|."""
    total = sum(b.count for b in bins)
    return sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins) if total else 0.0


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error of ``probs`` (float [N,C]) in ``bins`` equal-width bins."""
    return ece_of(reliability(probs, labels, bins))


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of Σ_classes (p_c − 1[c = label])² (0 is perfect, 2 the worst)."""
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float((probs - onehot).pow(2).sum(1).mean())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float(), labels))


def scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict:
    """ECE, NLL and Brier of ``softmax(logits / temperature)``; float [N,C], int [N]."""
    scaled = logits.float() / temperature
    probs = scaled.softmax(1)
    return {"ece": ece(probs, labels), "nll": nll(scaled, labels), "brier": brier(probs, labels)}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The one scalar T > 0 minimising the NLL of ``softmax(logits / T)`` on held-out data
    (L-BFGS on log T, so T stays positive). Argmax, hence accuracy, is unchanged."""
    logits = logits.float().detach()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and t > 0 else 1.0
