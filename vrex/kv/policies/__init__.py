"""KV selection policies, one small dataclass per file (NVIDIA kvpress style), and their registry.

=================  ===================================================  ==========
name               what it reads                                         offloads
=================  ===================================================  ==========
``full``           every past token (dense reference)                    no
``flexgen``        every past token, fetched from the offload tiers       yes
``infinigen``      token-level top-k per KV head by q.k (InfiniGen-P)     yes
``rekv``           frame-level top-k by mean frame key, per layer         yes
``streamingllm``   sink + recent window, the rest evicted                 no
``resv``           ReSV: hash clusters + WiCSum, per KV head              yes
``resv-noclust``   ReSV ablation: WiCSum over single tokens               yes
=================  ===================================================  ==========

>>> from vrex.kv.policies import make_policy
>>> make_policy("resv", ratio=0.2).ratio
0.2
"""

from __future__ import annotations

import dataclasses

from vrex.kv.policy import KVPolicy

from .flexgen import FlexGenPolicy
from .full import FullPolicy
from .infinigen import InfiniGenPolicy
from .rekv import ReKVPolicy
from .resv import ReSVPolicy
from .resv_noclust import ReSVNoClustPolicy
from .streamingllm import StreamingLLMPolicy

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (FullPolicy, FlexGenPolicy, InfiniGenPolicy, ReKVPolicy, StreamingLLMPolicy, ReSVPolicy, ReSVNoClustPolicy)
}


def policy_params(name: str) -> dict[str, object]:
    """The keyword arguments a policy accepts, with their defaults."""
    cls = _lookup(name)
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            out[f.name] = f.default if f.default is not dataclasses.MISSING else None
    return out


def _lookup(name: str) -> type[KVPolicy]:
    key = name.strip().lower().replace("_", "-")
    if key not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; valid policies: {', '.join(POLICIES)}")
    return POLICIES[key]


def make_policy(name: str, **kwargs) -> KVPolicy:
    """Build a policy by registry name; unknown names or keyword arguments raise ``ValueError``
    listing the valid ones."""
    cls = _lookup(name)
    valid = policy_params(cls.name)
    bad = [k for k in kwargs if k not in valid]
    if bad:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "(none)"
        raise ValueError(f"KV policy {cls.name!r} got unknown argument(s) {', '.join(bad)}; valid: {listed}")
    return cls(**kwargs)


__all__ = [
    "POLICIES", "make_policy", "policy_params",
    "FullPolicy", "FlexGenPolicy", "InfiniGenPolicy", "ReKVPolicy", "StreamingLLMPolicy", "ReSVPolicy", "ReSVNoClustPolicy",
]
