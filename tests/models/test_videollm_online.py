"""VideoLLM-online checkpoint layout: LoRA merged, connector mapped, session runs, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tiny_models import LLAMA3, save_live_checkpoint, save_lm
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.models.lm import load_lm
from vrex.models.videollm import load_videollm
from vrex.models.videollm_online import (LIVE1_PLUS, UnknownModelLayout, detect_layout, is_videollm_online,
                                         load_videollm_online)
from vrex.models.weights import WeightsNotFound

HUB_LM = "meta-llama/Meta-Llama-3-8B-Instruct"


@pytest.fixture(scope="module")
def published(tmp_path_factory, llama_dir):
    """Laid out like the published checkpoints: adapter only, base LM named by hub id."""
    path = tmp_path_factory.mktemp("videollm-online-published")
    peft_model = save_live_checkpoint(path, llama_dir, base_name=HUB_LM)
    return path, peft_model


@pytest.fixture(scope="module")
def loaded(published, llama_dir, siglip_dir):
    path, _ = published
    return load_videollm_online(path, base_lm=str(llama_dir), vision=str(siglip_dir))


def test_layout_on_disk(published):
    path, _ = published
    assert detect_layout(path) == "videollm-online" and is_videollm_online(str(path))
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == HUB_LM and cfg["modules_to_save"] == ["connector"]


def test_lora_is_merged(published, loaded, llama_dir):
    _, peft_model = published
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = loaded.lm(input_ids=ids).logits
        base = load_lm(str(llama_dir))[0](input_ids=ids).logits
    assert type(loaded.lm).__name__ == "LlamaForCausalLM" and not hasattr(loaded.lm, "connector")
    assert not any("lora" in name for name, _ in loaded.lm.named_modules())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the LoRA changed the model


def test_connector_weights_and_frames(published, loaded, frames):
    _, peft_model = published
    trained = peft_model.base_model.model.connector.modules_to_save["default"]
    torch.testing.assert_close(loaded.connector.fc1.weight, trained[0].weight, atol=0, rtol=0)
    torch.testing.assert_close(loaded.connector.fc1.bias, trained[0].bias, atol=0, rtol=0)
    torch.testing.assert_close(loaded.connector.fc2.weight, trained[2].weight, atol=0, rtol=0)
    torch.testing.assert_close(loaded.connector.fc2.bias, trained[2].bias, atol=0, rtol=0)
    assert loaded.connector.trained
    with torch.no_grad():
        want = trained(loaded.encoder(frames[:2]))
    torch.testing.assert_close(loaded.embed_frames(frames[:2]), want, atol=1e-5, rtol=1e-5)
    assert loaded.tokens_per_frame == 10  # live1+: pooler output + 3x3


def test_live_text_layout(loaded):
    fmt = loaded.fmt
    assert fmt.prefix == f"<|begin_of_text|>{LIVE1_PLUS.system_prompt}\n\n["
    assert (fmt.interval, fmt.respond, fmt.resume, fmt.stop) == (",", "]\nAssistant:", "\n[", "<|eot_id|>")
    assert fmt.question.format(question="Why?") == "]\nUser: Why?\nAssistant:"
    assert loaded.tokenize(fmt.prefix)[0] == loaded.tokenizer.bos_token_id


def test_session_runs_real_frames(loaded, frames):
    session = StreamingSession(loaded, make_policy("full"), SessionConfig(theta=1.01, max_response_tokens=3,
                                                                          max_answer_tokens=3))
    prefix = session.cached_tokens
    assert prefix == len(loaded.tokenize(loaded.fmt.prefix))
    first = session.push_frame(0.0, frames[0])
    assert first[0].stats["cached_tokens"] == prefix + 10
    assert [e.kind for e in first] == ["frame", "response"]
    events = list(session.run([(0.5, frames[1]), (1.0, frames[2])], questions=[(1.0, "What is on the table?")]))
    assert [e.kind for e in events] == ["frame", "response", "frame", "answer"]
    assert all(0.0 <= e.stats["p_interval"] <= 1.0 for e in events if e.kind == "frame")


def test_checkpoint_naming_local_paths_loads_without_arguments(tmp_path, published, llama_dir, siglip_dir):
    """A checkpoint whose adapter_config/config.json name local directories; config.json sets the grid."""
    src, peft_model = published
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(llama_dir)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    (path / "config.json").write_text(json.dumps({"model_type": "live_llama", "vision_pretrained": str(siglip_dir),
                                                  "frame_token_cls": True, "frame_token_pooled": [2, 2],
                                                  "frame_token_interval": ","}))
    model = load_videollm(lm=str(path), connector="auto")  # the CLI's defaults
    assert model.name.startswith("videollm-online") and model.connector.trained
    assert model.tokens_per_frame == 5 and model.encoder.name == str(siglip_dir)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model.lm(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_dispatch_with_overrides(published, llama_dir, siglip_dir):
    path, _ = published
    model = load_videollm(lm=str(path), base_lm=str(llama_dir), encoder=str(siglip_dir))
    assert model.name.startswith("videollm-online") and model.tokens_per_frame == 10
    assert model.fmt.respond == "]\nAssistant:"


def test_tied_embeddings_are_untied_before_merging(tmp_path, frames, siglip_dir):
    """LoRA on lm_head of a tied LM must not leak into the input embeddings."""
    base = save_lm(tmp_path / "tied", "llama", LLAMA3, tie=True, seed=5)
    peft_model = save_live_checkpoint(tmp_path / "ckpt", base, base_name=str(base))
    model = load_videollm_online(tmp_path / "ckpt", vision=str(siglip_dir))
    base_lm = AutoModelForCausalLM.from_pretrained(base)
    torch.testing.assert_close(model.lm.get_input_embeddings().weight, base_lm.get_input_embeddings().weight)
    assert (model.lm.get_output_embeddings().weight - base_lm.get_output_embeddings().weight).abs().max() > 1e-3
    ids = torch.tensor([[8, 6, 7, 5, 3, 0, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model.lm(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_base_lm_not_resolvable_offline(published, siglip_dir):
    path, _ = published
    with pytest.raises(WeightsNotFound, match=rf"{HUB_LM}.*base_lm=DIR"):
        load_videollm_online(path, vision=str(siglip_dir))


def test_vision_tower_not_resolvable_offline(published, llama_dir):
    path, _ = published
    with pytest.raises(WeightsNotFound, match=rf"{LIVE1_PLUS.vision_pretrained}.*vision=DIR"):
        load_videollm_online(path, base_lm=str(llama_dir))


def test_checkpoint_repo_id_offline():
    with pytest.raises(WeightsNotFound, match="hf download chenjoya/videollm-online-8b-v1plus"):
        load_videollm_online("chenjoya/videollm-online-8b-v1plus")
    with pytest.raises(WeightsNotFound, match="hf download chenjoya/videollm-online-8b-v1plus"):
        load_videollm(lm="chenjoya/videollm-online-8b-v1plus")


def test_adapter_for_another_base_lm_is_rejected(tmp_path, published, siglip_dir):
    path, _ = published
    one_layer = save_lm(tmp_path / "one-layer", "llama", LLAMA3, layers=1)
    with pytest.raises(ValueError, match="match no module of the base LM"):
        load_videollm_online(path, base_lm=str(one_layer), vision=str(siglip_dir))


def test_vision_tower_of_wrong_width_is_rejected(tmp_path, published, llama_dir):
    from tiny_models import save_vision

    path, _ = published
    wide = save_vision(tmp_path / "wide", "siglip", hidden=64)
    with pytest.raises(ValueError, match="64-d features.*takes 32-d"):
        load_videollm_online(path, base_lm=str(llama_dir), vision=str(wide))


def test_plain_lora_adapter_is_not_a_videollm_online_checkpoint(tmp_path, llama_dir):
    lm = AutoModelForCausalLM.from_pretrained(llama_dir)
    get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(UnknownModelLayout, match=rf"{tmp_path}.*without a 'connector'.*VideoLLM-online checkpoint"):
        load_videollm(lm=str(tmp_path))


def test_frames_are_letterboxed_like_videollm_online(loaded, frames):
    """VideoLLM-online pads frames to a black square (ffmpeg pad), it does not stretch them."""
    from PIL import Image

    from vrex.models.encoders import HFVisionEncoder

    image = frames[0].resize((96, 48))
    padded = Image.new("RGB", (96, 96))
    padded.paste(image, (0, 24))
    plain = HFVisionEncoder(loaded.encoder.name, grid=3)
    torch.testing.assert_close(loaded.encoder([image]), plain([padded]), atol=1e-6, rtol=1e-6)
    assert (loaded.encoder([image]) - plain([image])).abs().max() > 1e-3


def test_base_lm_of_wrong_width_is_rejected(tmp_path, published, siglip_dir):
    path, _ = published
    narrow = save_lm(tmp_path / "narrow", "llama", LLAMA3, hidden=32)
    with pytest.raises(ValueError, match="hidden size 32.*outputs 48"):
        load_videollm_online(path, base_lm=str(narrow), vision=str(siglip_dir))


def test_pickled_adapter_file(tmp_path, published, llama_dir, siglip_dir):
    """Older peft wrote adapter_model.bin; detection goes by modules_to_save, loading by peft."""
    _, peft_model = published
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    assert detect_layout(tmp_path) == "videollm-online"
    model = load_videollm_online(tmp_path, base_lm=str(llama_dir), vision=str(siglip_dir))
    ids = torch.tensor([[2, 7, 1, 8, 2, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model.lm(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
