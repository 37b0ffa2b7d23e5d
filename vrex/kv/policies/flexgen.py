"""``flexgen``: everything offloaded, everything fetched every step.

Paper: Sheng et al., "FlexGen: High-Throughput Generative Inference of Large Language Models with a
Single GPU", ICML 2023 (the V-Rex paper's offload baseline). No parameters: the store's budgets
decide what is offloaded; the policy reads all past tokens, so the whole offloaded KV crosses the link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .full import FullPolicy


@dataclass
class FlexGenPolicy(FullPolicy):
    """``full``'s selection (every past token) over an offloading store."""

    name: ClassVar[str] = "flexgen"
    offloads: ClassVar[bool] = True
