"""An LM loaded in bfloat16 (``load_videollm(lm_dtype=...)``): half the weight bytes, attention and the KV
store in float32 on CPU (bf16 on request), the gate's P(interval) close to float32's on real frames; refused dtypes name themselves."""

import pytest
import torch

from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.models.videollm import load_videollm


def _p_interval(model, photos, policy: str) -> list[float]:
    s = StreamingSession(model, make_policy(policy), SessionConfig(theta=0.0))
    return [s.push_frame(0.5 * i, image)[0].stats["p_interval"] for i, image in enumerate(photos[:4])]


def test_bfloat16_lm_runs_close_to_float32(photos):
    fp32 = load_videollm()
    bf16 = load_videollm(lm_dtype=torch.bfloat16)
    assert bf16.lm.dtype == torch.bfloat16 and fp32.lm.dtype == torch.float32
    assert any("bfloat16" in note for note in bf16.notes)
    weight_bytes = [sum(p.numel() * p.element_size() for p in m.lm.parameters()) for m in (fp32, bf16)]
    assert weight_bytes[1] * 2 == weight_bytes[0]
    for policy in ("full", "resv"):
        s = StreamingSession(bf16, make_policy(policy), SessionConfig(theta=0.0))
        s.push_frame(0.0, photos[0])
        assert s.store.dtype == torch.float32
        assert StreamingSession(bf16, make_policy(policy), SessionConfig(kv_dtype="bfloat16")).store.dtype == torch.bfloat16
        ref, got = _p_interval(fp32, photos, policy), _p_interval(bf16, photos, policy)
        assert got == pytest.approx(ref, abs=0.05), policy
        assert got != ref  # it did run in another precision


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="lm_dtype"):
        load_videollm(lm_dtype=torch.float16)
