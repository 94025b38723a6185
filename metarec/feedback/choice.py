"""How a simulated user reacts to a shown top-k list.

Position j (1-based) is looked at with probability j^-decay (rank attention as in Chaney, Stewart
and Engelhardt, RecSys 2018, who use decay 0.8); a looked-at item is accepted with a probability
that rises with its true utility, a logistic curve centred at `center` (by default the mean
observed rating) with scale `temperature`. `factor` scales one user's acceptance (1 for everyone
except when a bias is planted to check that the audit detects it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit


@dataclass(frozen=True)
class ChoiceModel:
    center: float
    temperature: float = 0.5
    attention_decay: float = 0.8

    def attention(self, k: int) -> np.ndarray:
        return np.arange(1, k + 1, dtype=float) ** -self.attention_decay

    def accept_probability(self, utility: np.ndarray, factor: np.ndarray | float = 1.0) -> np.ndarray:
        """[n, k] probabilities that each listed item is seen and accepted."""
        u = np.asarray(utility, dtype=float)
        f = np.asarray(factor, dtype=float)
        f = f[:, None] if f.ndim == 1 else f
        return self.attention(u.shape[-1]) * expit((u - self.center) / self.temperature) * f
