"""Llama- and Qwen2-family LMs from directories, run in a real StreamingSession on real frames."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from vrex.engine.positions import PositionConfig
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import make_policy
from vrex.models.lm import load_lm
from vrex.models.videollm import load_videollm
from vrex.models.videollm_online import UnknownModelLayout
from vrex.models.weights import WeightsNotFound

FAMILIES = {"llama": ("llama_dir", "LlamaForCausalLM", "<|start_header_id|>"),
            "qwen2": ("qwen2_dir", "Qwen2ForCausalLM", "<|im_start|>")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_lm_from_directory(family, request):
    fixture, cls, chat_marker = FAMILIES[family]
    path = request.getfixturevalue(fixture)
    model, tokenizer = load_lm(str(path))
    assert type(model).__name__ == cls and model.config.model_type == family
    assert model.dtype == torch.float32 and not model.training
    saved = load_file(str(path / "model.safetensors"))
    state = model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    assert chat_marker in tokenizer.get_vocab()
    assert len(tokenizer(",", add_special_tokens=False)["input_ids"]) == 1


def _frame_logits(lm) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    captured: list[torch.Tensor] = []
    handle = lm.register_forward_hook(lambda module, args, out: captured.append(out.logits[0].detach().clone()))
    return captured, handle


@pytest.mark.parametrize("family", list(FAMILIES))
def test_session_iterative_prefill_equals_one_shot(family, request, frames):
    """Per-frame prefill through the vrex KV cache == one forward over the same interleaved embeddings."""
    path = request.getfixturevalue(FAMILIES[family][0])
    model = load_videollm(lm=str(path), connector=None)  # EfficientNet-Lite0 (real weights) + tiny LM
    assert model.fmt.interval == "," and FAMILIES[family][2] in model.fmt.prefix
    session = StreamingSession(model, make_policy("full"),
                               SessionConfig(theta=0.0, positions=PositionConfig(mode="absolute")))
    captured, handle = _frame_logits(model.lm)
    # the frames' embeddings as the session computed them (the encoder is the slow part: run it once)
    frame_embeds: list[torch.Tensor] = []
    conn_handle = model.connector.register_forward_hook(lambda m, a, out: frame_embeds.append(out[0].detach().clone()))
    p_interval = []
    try:
        for i, image in enumerate(frames[:3]):
            events = session.push_frame(0.5 * i, image)
            assert [e.kind for e in events] == ["frame"]  # theta=0: never speaks
            p_interval.append(events[0].stats["p_interval"])
    finally:
        handle.remove()
        conn_handle.remove()
    assert len(frame_embeds) == 3 and frame_embeds[0].shape == (10, model.lm.config.hidden_size)

    # The reference: one forward, eager attention, no cache.
    comma = model.embed_text(torch.tensor([model.token_id(",")]))
    parts, ends = [model.embed_text(model.tokenize(model.fmt.prefix))], []
    for i, embeds in enumerate(frame_embeds):
        if i:
            parts.append(comma)
        parts.append(embeds)
        ends.append(sum(p.shape[0] for p in parts) - 1)
    model.lm.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model.lm(inputs_embeds=torch.cat(parts)[None]).logits[0]
    assert len(captured) == 3 and session.cached_tokens == ends[-1] + 1
    for step, end, p in zip(captured, ends, p_interval):
        torch.testing.assert_close(step[-1], ref[end], atol=1e-4, rtol=1e-4)
        assert p == pytest.approx(float(ref[end].softmax(-1)[model.token_id(",")]), abs=1e-5)
    # distinct frames -> distinct predictions (the frames reach the LM)
    assert (ref[ends[0]] - ref[ends[1]]).abs().max() > 1e-3


def test_session_speaks_and_answers_with_qwen2(qwen2_dir, frames):
    model = load_videollm(lm=str(qwen2_dir), connector=None)
    session = StreamingSession(model, make_policy("full"), SessionConfig(theta=1.01, max_response_tokens=3,
                                                                         max_answer_tokens=3))
    events = list(session.run([(0.0, frames[0]), (0.5, frames[1])], questions=[(0.5, "What do you see?")]))
    kinds = [e.kind for e in events]
    assert kinds == ["frame", "response", "frame", "answer"]
    for e in events[1::2]:
        assert 1 <= e.stats["tokens"] <= 3
    # every token that was prefilled or decoded sits in the cache
    assert session.cached_tokens > 2 * model.tokens_per_frame


def test_unsupported_model_type_lists_supported(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, qwen2"):
        load_lm(str(tmp_path))
    with pytest.raises(UnknownModelLayout, match=r"'gpt2'.*llama, qwen2"):
        load_videollm(lm=str(tmp_path))


def test_directory_of_no_layout_names_path_and_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(WeightsNotFound, match="has no config.json") as err:
        load_lm(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(UnknownModelLayout) as err:
        load_videollm(lm=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "causal-LM directory" in msg and "VideoLLM-online checkpoint" in msg


def test_vision_tower_given_as_lm(siglip_dir):
    with pytest.raises(UnknownModelLayout, match="vision tower.*encoder"):
        load_videollm(lm=str(siglip_dir))


def test_unknown_repo_id_offline():
    with pytest.raises(WeightsNotFound, match="hf download no-such-org/no-such-lm"):
        load_videollm(lm="no-such-org/no-such-lm")


def test_lm_directory_without_tokenizer(tmp_path, qwen2_dir):
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(qwen2_dir / name, tmp_path / name)
    with pytest.raises(WeightsNotFound, match="no usable tokenizer"):
        load_lm(str(tmp_path))
