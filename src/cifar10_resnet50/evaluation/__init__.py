"""Evaluation: scoring a model on a test set (:mod:`.evaluate`), calibration and intervals
(:mod:`.calibration`), CIFAR-10-C corruptions and the robustness sweep (:mod:`.corruptions`,
:mod:`.robustness`), side-by-side comparison (:mod:`.compare`) and the figures (:mod:`.plots`).
Imports no training code."""
