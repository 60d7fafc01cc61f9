"""The two sparse weightings the similarity-based init methods use.

* :func:`sparsemax` (Martins and Astudillo, 2016): the Euclidean projection of a score
  vector onto the probability simplex. Unlike softmax it gives exact zeros, so a new
  token is a combination of only the old tokens that are clearly most similar (FOCUS's
  weighting).
* :func:`omp`: orthogonal matching pursuit: greedily pick the atom most correlated with
  what is left unexplained, refit the coefficients of all picked atoms by least squares,
  repeat up to ``k`` atoms; the coefficients are free (any sign, any size).
"""

from __future__ import annotations

import numpy as np

__all__ = ["omp", "sparsemax"]


def sparsemax(scores: np.ndarray) -> np.ndarray:
    """Weights >= 0 summing to 1, zero below a threshold (1-D ``scores``)."""
    z = np.asarray(scores, dtype=np.float64)
    ordered = np.sort(z)[::-1]
    cums = np.cumsum(ordered)
    ks = np.arange(1, z.size + 1)
    support = ks[1 + ks * ordered > cums]
    k = int(support[-1]) if support.size else 1
    tau = (cums[k - 1] - 1) / k
    return np.maximum(z - tau, 0.0)


def omp(atoms: np.ndarray, y: np.ndarray, k: int, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` columns of ``atoms`` ([dim, n]) and their coefficients approximating ``y``
    ([dim]) by least squares: ``(indices, coefficients)``."""
    a = np.asarray(atoms, dtype=np.float64)
    target = np.asarray(y, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=0), 1e-12)
    residual = target.copy()
    chosen: list[int] = []
    coef = np.zeros(0)
    scale = max(float(np.linalg.norm(target)), 1e-12)
    for _ in range(min(k, a.shape[1])):
        scores = np.abs(a.T @ residual) / norms
        scores[chosen] = -1.0
        chosen.append(int(np.argmax(scores)))
        coef, *_ = np.linalg.lstsq(a[:, chosen], target, rcond=None)
        residual = target - a[:, chosen] @ coef
        if np.linalg.norm(residual) <= tol * scale:
            break
    return np.asarray(chosen, dtype=np.int64), coef
