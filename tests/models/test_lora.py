"""LoRA adapters ride in the connector's weight file and load back into a fresh LM exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vrex.models.connector import Connector
from vrex.models.lora import add_lora, file_has_lora, has_lora, load_lora, lora_metadata, lora_state, merge_lora


def _tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_adapters_round_trip_through_the_connector_file(tmp_path):
    lm = _tiny_lm()
    ids = torch.arange(10)[None]
    plain = lm(ids).logits
    add_lora(lm, 4)
    torch.testing.assert_close(lm(ids).logits, plain)  # B = 0: unchanged until trained
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted = lm(ids).logits
    assert not torch.allclose(adapted, plain)
    conn = Connector(8, 32, seed=1, temporal=True)
    path = tmp_path / "weights.safetensors"
    conn.save(path, metadata=lora_metadata(4), extra=lora_state(lm))
    fresh = _tiny_lm()
    assert file_has_lora(path) and load_lora(fresh, path)
    torch.testing.assert_close(fresh(ids).logits, adapted)
    loaded = Connector(8, 32, seed=2).load(path)  # the lm.* tensors are not the connector's
    assert loaded.temporal and torch.equal(loaded.fc1.weight, conn.fc1.weight)
    with pytest.raises(ValueError, match="already has LoRA"):
        load_lora(fresh, path)


def test_connector_only_file_has_no_adapters(tmp_path):
    path = tmp_path / "c.safetensors"
    Connector(8, 32).save(path)
    lm = _tiny_lm()
    assert not file_has_lora(path) and not load_lora(lm, path)
    assert not any("lora_" in n for n, _ in lm.named_parameters())


def test_adapters_without_rank_are_refused(tmp_path):
    lm = _tiny_lm()
    add_lora(lm, 2)
    path = tmp_path / "bad.safetensors"
    Connector(8, 32).save(path, extra=lora_state(lm))
    with pytest.raises(ValueError, match="lora_rank"):
        load_lora(_tiny_lm(), path)


def test_load_videollm_loads_the_adapters_of_its_weight_file(videollm, tmp_path):
    import copy

    from vrex.models.videollm import load_videollm

    lm = copy.deepcopy(videollm.lm)
    add_lora(lm, 2, ("q_proj", "v_proj"))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "with-lora.safetensors"
    videollm.connector.save(path, metadata=lora_metadata(2, ("q_proj", "v_proj")), extra=lora_state(lm))
    model = load_videollm(connector=path)
    ids = videollm.tokenize("A cockatoo on a branch.")[None]
    with torch.no_grad():
        # merged on load (W + scale B A): equal up to float summation order
        torch.testing.assert_close(model.lm(ids).logits, lm(ids).logits, rtol=1e-4, atol=2e-4)
        assert not torch.allclose(model.lm(ids).logits, videollm.lm(ids).logits)
    assert not has_lora(model.lm)
    assert any("LoRA" in n for n in model.notes)


def test_shipped_long_variant_loads_connector_and_adapters(videollm):
    from vrex.models.videollm import load_videollm, shipped_connector

    path = shipped_connector(videollm.encoder.name, "smollm2-135m", "-long")
    if path is None:
        pytest.skip("the long-context weights are not shipped in this checkout")
    model = load_videollm(connector="long")
    assert model.connector.trained and model.connector.source == str(path)
    assert not has_lora(model.lm) and any("LoRA" in n and "merged" in n for n in model.notes)  # merged on load
    ids = videollm.tokenize("What appeared briefly in the stream?")[None]
    with torch.no_grad():  # the adapters change the LM
        assert not torch.allclose(model.lm(ids).logits, videollm.lm(ids).logits)


def test_merged_adapters_give_the_same_logits_from_plain_layers():
    lm = _tiny_lm()
    ids = torch.arange(12)[None]
    add_lora(lm, 4)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted = lm(ids).logits
    assert merge_lora(lm) == 2 * 7  # every target module of both layers
    assert not has_lora(lm)
    assert all(type(m) is torch.nn.Linear for n, m in lm.named_modules() if n.endswith(("q_proj", "down_proj")))
    torch.testing.assert_close(lm(ids).logits, adapted, rtol=1e-5, atol=1e-5)
