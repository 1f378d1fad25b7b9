"""Linear algebra that FID and its bootstrap interval share, kept apart from fid.py: that module
needs clean-fid and torchvision, and the interval code (which the CLIP score's interval imports
too) should not."""
from __future__ import annotations

import numpy as np


def trace_sqrt(inner: np.ndarray) -> float:
    """The trace of the square root of a symmetric PSD matrix: the sum of its eigenvalues' roots.

    Eigenvalues that are zero in exact arithmetic (rank-deficient S1, or S1 = S2) come out as
    rounding noise of either sign, ~1e-16 x the largest; the square root would blow that up to
    ~1e-8 (which BLAS build decides), so everything below the solver's precision counts as zero."""
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    eig = np.where(eig > eig.max(initial=0.0) * len(eig) * np.finfo(eig.dtype).eps, eig, 0.0)
    return float(np.sqrt(eig).sum())
