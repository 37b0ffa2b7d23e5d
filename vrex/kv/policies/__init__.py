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
>>> make_policy("resv[ratio=0.2,score_norm=softmax]").score_norm
'softmax'
"""

from __future__ import annotations

from vrex.kv.policy import KVPolicy

from .flexgen import FlexGenPolicy
from .full import FullPolicy
from .infinigen import InfiniGenPolicy
from .rekv import ReKVPolicy
from .resv import ReSVPolicy
from .resv_noclust import ReSVNoClustPolicy
from .spec import PolicySpecError, build_policy, check_params, parse_policy_spec, policy_params
from .streamingllm import StreamingLLMPolicy

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (FullPolicy, FlexGenPolicy, InfiniGenPolicy, ReKVPolicy, StreamingLLMPolicy, ReSVPolicy, ReSVNoClustPolicy)
}


def make_policy(spec: str, **kwargs) -> KVPolicy:
    """Build a policy from a registry name or a spec, ``make_policy("resv", ratio=0.2)`` or
    ``make_policy("resv[ratio=0.2]")`` (:mod:`vrex.kv.policies.spec`). An unknown name or
    parameter, a wrong type or an out-of-range value raises :class:`PolicySpecError` (a
    ``ValueError``) naming it and listing what is allowed; no model is needed to find out."""
    name, params = parse_policy_spec(spec)
    both = sorted(set(params) & set(kwargs))
    if both:
        raise PolicySpecError(f"policy spec '{spec}' and the keyword arguments both set {', '.join(both)}")
    return build_policy(name, {**params, **check_params(name, kwargs)})


__all__ = [
    "POLICIES", "make_policy", "policy_params", "parse_policy_spec", "PolicySpecError",
    "FullPolicy", "FlexGenPolicy", "InfiniGenPolicy", "ReKVPolicy", "StreamingLLMPolicy", "ReSVPolicy", "ReSVNoClustPolicy",
]
