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

__all__ = ["omp", "omp_batch", "sparsemax"]


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
    ([dim]) by least squares: ``(indices, coefficients)`` (:func:`omp_batch` for one target,
    every column a candidate)."""
    a = np.asarray(atoms, dtype=np.float64)
    idx, coef = omp_batch(a.T, np.arange(a.shape[1])[None, :], np.asarray(y, dtype=np.float64)[None, :], k, tol)
    n = int((idx[0] >= 0).sum())
    return idx[0, :n], coef[0, :n]


def omp_batch(atoms: np.ndarray, near: np.ndarray, targets: np.ndarray, k: int, tol: float = 1e-6,
              block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """:func:`omp` for many targets at once: target ``t`` ([dim], a row of ``targets``) is
    fitted with the rows ``near[t]`` of ``atoms`` ([atoms, dim]) as its candidates.

    Returns ``(indices, coefficients)``, both ``[targets, k]``: indices into ``atoms``
    (``-1`` past a target's last pick) and coefficients (``0`` there). The picks and the
    stopping rule are :func:`omp`'s, worked for a block of targets per numpy call (the Gram
    matrices of a block's candidates, the batched normal equations), so the cost is a few
    array operations per step instead of Python work per target."""
    atoms = np.asarray(atoms, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    n_targets, width = near.shape
    steps = min(k, width)
    # a block's gathered candidates ([block, width, dim] float64) stay near 128 MB (an 8B
    # model's donor space, dim 4096 and 64 candidates: 64 targets a block)
    block = max(1, min(block, (128 << 20) // max(1, width * atoms.shape[1] * 8)))
    out_idx = np.full((n_targets, k), -1, dtype=np.int64)
    out_coef = np.zeros((n_targets, k))
    for start in range(0, n_targets, block):
        cand = near[start:start + block]
        a = atoms[cand]                                    # [b, width, dim]
        y = targets[start:start + block]                   # [b, dim]
        gram = a @ a.transpose(0, 2, 1)                    # [b, width, width]
        corr = np.einsum("bwd,bd->bw", a, y)
        norms = np.maximum(np.sqrt(np.maximum(np.einsum("bww->bw", gram), 0.0)), 1e-12)
        energy = np.einsum("bd,bd->b", y, y)
        limit = (tol * np.maximum(np.sqrt(energy), 1e-12)) ** 2
        picked = np.zeros((len(cand), steps), dtype=np.int64)   # positions within the candidates
        coef = np.zeros((len(cand), steps))
        size = np.zeros(len(cand), dtype=np.int64)
        live = np.arange(len(cand))
        residual = corr.copy()
        for s in range(steps):
            scores = np.abs(residual[live]) / norms[live]
            if s:
                np.put_along_axis(scores, picked[live, :s], -1.0, axis=1)
            picked[live, s] = np.argmax(scores, axis=1)
            sel = picked[live, :s + 1]                           # [l, s+1]
            g_live = gram[live]
            sub = np.take_along_axis(np.take_along_axis(g_live, sel[:, :, None], 1), sel[:, None, :], 2)
            rhs = np.take_along_axis(corr[live], sel, 1)
            try:
                x = np.linalg.solve(sub, rhs[..., None])[..., 0]
            except np.linalg.LinAlgError:  # a pick repeats another: least squares, row by row
                x = np.stack([np.linalg.lstsq(m, r, rcond=None)[0] for m, r in zip(sub, rhs)])
            coef[live, :s + 1] = x
            size[live] = s + 1
            cols = np.take_along_axis(g_live, np.broadcast_to(sel[:, None, :], (len(live), width, s + 1)), 2)
            residual[live] = corr[live] - np.einsum("lws,ls->lw", cols, x)
            left = energy[live] - np.einsum("ls,ls->l", x, rhs)
            live = live[left > limit[live]]
            if not len(live):
                break
        for row in range(len(cand)):
            n = size[row]
            out_idx[start + row, :n] = cand[row, picked[row, :n]]
            out_coef[start + row, :n] = coef[row, :n]
    return out_idx, out_coef
