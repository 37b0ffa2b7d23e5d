"""``resv-noclust``: ReSV without clustering (the paper's ablation): WiCSum over single tokens.

Paper: V-Rex (arXiv 2512.12284), ReSV ablation "without clustering" (1.6x speedup, -0.3% accuracy,
vs 9.4x / -0.8% with clustering). Same parameters as ``resv`` (``ratio`` 0.3, ``score_norm``,
``sort_by``, ...); every token is its own cluster (TC = 1, mean key = the key), no hashing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .resv import ReSVPolicy


@dataclass
class ReSVNoClustPolicy(ReSVPolicy):
    name: ClassVar[str] = "resv-noclust"
    clustering: bool = False
