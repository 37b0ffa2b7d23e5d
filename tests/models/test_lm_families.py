"""Any causal LM transformers runs: tiny models of each family (``tiny_models.FAMILIES``) load from their
directories, get their own chat layout, and run every policy in a real StreamingSession on real frames;
what the engine cannot run is refused with one line naming the missing capability.
(Equality with transformers' own forward: test_lm_equality.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration
from typer.testing import CliRunner

from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.layers import UnsupportedModel
from vrex.kv.policies import POLICIES, make_policy
from vrex.models.live_format import DEFAULT_SYSTEM, LiveFormat, LiveFormatError
from vrex.models.lm import TESTED_LM_TYPES, load_lm
from vrex.models.videollm import load_videollm
from vrex.models.videollm_online import UnknownModelLayout
from vrex.models.weights import WeightsNotFound

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO.parent / "shared" / "assets" / "videos" / "cockatoo.mp4"

#: family -> (transformers class, model_type, start of the layout's prefix, respond, stop)
EXPECTED = {
    "llama": ("LlamaForCausalLM", "llama", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", "<|im_start|>system\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    "qwen2_sliding": ("Qwen2ForCausalLM", "qwen2", "<|im_start|>system\n", "<|im_end|>\n<|im_start|>assistant\n",
                      "<|im_end|>"),
    "mistral": ("MistralForCausalLM", "mistral", "<s>[INST] You are", " [/INST]", "</s>"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3_text", "<bos><start_of_turn>user\nYou are",
                    "<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", "<bos><start_of_turn>user\nYou are", "<end_of_turn>\n<start_of_turn>model\n",
               "<end_of_turn>"),
    "phi3": ("Phi3ForCausalLM", "phi3", "<|system|>\nYou are", "<|end|>\n<|assistant|>\n", "<|end|>"),
    "gpt_neox": ("GPTNeoXForCausalLM", "gpt_neox", "You are", "]\nAssistant:", "<|endoftext|>"),  # no template: plain layout
    "cohere": ("CohereForCausalLM", "cohere", "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are",
               "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
    "glm": ("GlmForCausalLM", "glm", "<|im_start|>system\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
}


def test_every_family_has_expectations():
    assert set(EXPECTED) == set(FAMILIES)
    # the families vrex calls tested (no "not among the families" note) are exactly those tested here
    assert {EXPECTED[family][1] for family in FAMILIES} == set(TESTED_LM_TYPES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_lm_from_directory(family, family_dir):
    path = family_dir(family)
    cls, model_type = EXPECTED[family][:2]
    model, tokenizer = load_lm(str(path))
    assert type(model).__name__ == cls and model.config.model_type == model_type
    assert model.dtype == torch.float32 and not model.training
    saved = load_file(str(path / "model.safetensors"))
    state = model.state_dict()
    for key, value in saved.items():
        # a tied output head (GPT-NeoX's embed_out) is saved under its own name but shares the embedding
        got = state[key] if key in state else model.get_output_embeddings().weight
        torch.testing.assert_close(got, value, atol=0, rtol=0)
    assert len(tokenizer(",", add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_comes_from_the_models_own_chat_template(family, family_dir):
    _, tokenizer = load_lm(str(family_dir(family)))
    fmt = LiveFormat.for_tokenizer(tokenizer)
    prefix, respond, stop = EXPECTED[family][2:]
    assert fmt.prefix.startswith(prefix) and DEFAULT_SYSTEM in fmt.prefix
    assert fmt.respond == respond and fmt.stop == stop
    if tokenizer.chat_template:  # the template's own turn markers around the question
        assert fmt.question == "\n{question}" + respond
    else:  # plain layout: a "User:" turn of its own, closed by the response marker
        assert "{question}" in fmt.question and fmt.question.endswith(respond.split("\n")[-1])
    ids = tokenizer(fmt.prefix, add_special_tokens=False)["input_ids"]
    if tokenizer.chat_template and "bos_token" in tokenizer.chat_template:  # BOS where the model expects one
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert len(tokenizer(fmt.stop, add_special_tokens=False)["input_ids"]) == 1  # one end-of-turn token


def test_smollm2_layout_is_the_one_its_connector_was_trained_with():
    from transformers import AutoTokenizer

    from vrex.models.lm import smollm2_dir

    fmt = LiveFormat.for_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir()))
    assert fmt == LiveFormat(prefix=f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n", interval=",",
                             respond="<|im_end|>\n<|im_start|>assistant\n",
                             question="\n{question}<|im_end|>\n<|im_start|>assistant\n", resume="\n<|im_start|>user\n",
                             stop="<|im_end|>")


def test_template_that_cannot_end_a_reply_is_refused(tmp_path, family_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(family_dir("qwen2") / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(LiveFormatError, match=rf"LM '{tmp_path}'.*does not start with a special token"):
        load_videollm(lm=str(tmp_path), connector=None)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_runs_a_short_session(family, policy, family_model, frames):
    model = family_model(family)
    assert any("UNTRAINED" in note for note in model.notes)
    session = StreamingSession(model, make_policy(policy), SessionConfig(theta=1.01, max_response_tokens=3,
                                                                         max_answer_tokens=3, device_tokens=24))
    events = list(session.run([(0.0, frames[0]), (0.5, frames[1]), (1.0, frames[2])], questions=[(1.0, "What is shown?")]))
    assert [e.kind for e in events] == ["frame", "response", "frame", "response", "frame", "answer"]
    assert all(1 <= e.stats["tokens"] <= 3 for e in events if e.kind != "frame")
    assert session.cached_tokens > 3 * model.tokens_per_frame


def test_model_without_rope_is_refused_naming_the_capability(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match=r"cannot run in vrex's engine: no rotary position embedding"):
        load_lm(str(tmp_path))
    with pytest.raises(UnsupportedModel, match="no rotary position embedding"):
        load_videollm(lm=str(tmp_path))


def test_not_a_causal_lm_is_refused(tmp_path):
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64, d_kv=8)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match=r"not a causal language model: transformers' AutoModelForCausalLM"):
        load_lm(str(tmp_path))
    with pytest.raises(UnknownModelLayout, match=r"'t5' model, not a causal language model"):
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


def test_lm_directory_without_tokenizer(tmp_path, family_dir):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(family_dir("qwen2") / name, tmp_path / name)
    with pytest.raises(WeightsNotFound, match="no usable tokenizer"):
        load_lm(str(tmp_path))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vrex_run_on_every_family(family, family_dir):
    """``vrex run CLIP --lm DIR`` as a user runs it; the output says the connector is untrained for it."""
    from vrex.cli import app

    if not CLIP.is_file():
        pytest.skip(f"{CLIP} not found")
    result = CliRunner().invoke(app, ["run", str(CLIP), "--lm", str(family_dir(family)), "--max-frames", "3", "--theta", "0",
                                      "--ask", "1:What do you see?", "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["kind"] for e in events if e["kind"] in ("frame", "answer")] == ["frame", "frame", "frame", "answer"]
    assert "UNTRAINED" in result.output


def test_vrex_run_refuses_an_unsupported_lm_in_one_line(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vrex.cli", "run", str(CLIP), "--lm", str(tmp_path), "--max-frames", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no rotary position embedding" in errors[0] and "Traceback" not in proc.stderr
