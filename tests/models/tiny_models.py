"""Tiny random-weight models saved in the layouts vrex loads (no hub: everything is built here).

Each helper writes a directory exactly as ``save_pretrained`` / ``hf download`` would lay it out:
causal LMs of several families (Llama, Qwen2 with and without sliding layers, Mistral with a small
window, Gemma 3 with local and global layers, Gemma 2 with attention soft-capping, Phi-3 and GPT-NeoX
with partial rotary) with a tokenizer beside them, SigLIP and CLIP vision towers with their image processors. Tokenizers are small
byte-level BPEs trained here, with each family's special tokens and a chat template written like the
family's own (GPT-NeoX has none, as its base models ship none).
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = (
    "A multimodal AI assistant is helping users with some activities. Below is their conversation, "
    "interleaved with the list of video frames received by the assistant.\nUser: What do you see?\n"
    "Assistant: A bird on a branch, a cat, a horse, coffee, bricks and a camera.\n"
    "You are a live video assistant. Frames of a video stream arrive over time. When the scene changes, "
    "say in a few words what is shown. Answer the user's questions about the stream."
) * 4
CHATML = {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>", "bos": None,
          "template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                      "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"}
LLAMA3 = {"special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
          "eos": "<|eot_id|>", "bos": "<|begin_of_text|>",
          "template": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                      "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"}
#: Gemma's turns: no system role (the system text opens the first user turn), the reply role is "model"
GEMMA = {"special": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "eos": "<eos>", "bos": "<bos>",
         "template": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
                     "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
                     "{% endif %}{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' "
                     "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + "
                     "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"}
#: Mistral's [INST] turns: roles must alternate, a system message is refused by the template
MISTRAL = {"special": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "eos": "</s>", "bos": "<s>",
           "template": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                       "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                       "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                       "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"}
PHI3 = {"special": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "eos": "<|endoftext|>",
        "bos": None,
        "template": "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"}
#: Cohere's turns: <|START_OF_TURN_TOKEN|> + a role token, the reply ends with <|END_OF_TURN_TOKEN|>
COHERE = {"special": ["<PAD>", "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
                      "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"], "eos": "<|END_OF_TURN_TOKEN|>", "bos": "<BOS_TOKEN>",
          "template": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{% set role = "
                      "'<|SYSTEM_TOKEN|>' %}{% elif message['role'] == 'user' %}{% set role = '<|USER_TOKEN|>' %}{% else %}"
                      "{% set role = '<|CHATBOT_TOKEN|>' %}{% endif %}{{ '<|START_OF_TURN_TOKEN|>' + role + message['content']"
                      " + '<|END_OF_TURN_TOKEN|>' }}{% endfor %}{% if add_generation_prompt %}"
                      "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"}
NEOX = {"special": ["<|endoftext|>"], "eos": "<|endoftext|>", "bos": "<|endoftext|>", "template": None}
#: family -> (tokenizer style, config overrides); WINDOW: the sliding window of the tiny sliding models
WINDOW = 16
FAMILIES = {
    "llama": (LLAMA3, {}),
    "qwen2": (CHATML, {}),
    "qwen2_sliding": (CHATML, {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "mistral": (MISTRAL, {"sliding_window": WINDOW}),
    "gemma3_text": (GEMMA, {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                            "head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma2": (GEMMA, {"sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 16,
                       "attn_logit_softcapping": 2.0, "final_logit_softcapping": 30.0}),
    "phi3": (PHI3, {"partial_rotary_factor": 0.5}),
    "gpt_neox": (NEOX, {"rotary_pct": 0.5}),
    # interleaved-pair RoPE (2i with 2i + 1), found by vrex.kv.layers.rope_layouts; GLM also partial (half the dims)
    "cohere": (COHERE, {}),
    "glm": (CHATML, {"partial_rotary_factor": 0.5, "head_dim": 12}),
}


def make_tokenizer(style: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=style["special"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=style["eos"], bos_token=style["bos"],
                                   pad_token=style["eos"])
    fast.chat_template = style.get("template")
    return fast


def save_lm(path: Path, family: str, style: dict | None = None, *, seed: int = 0, tie: bool = False, hidden: int = 48,
            layers: int = 2, **overrides) -> Path:
    """A tiny ``family`` model (a key of ``FAMILIES``) with its tokenizer, saved in the Hugging Face layout."""
    import transformers

    family_style, family_kw = FAMILIES[family]
    tokenizer = make_tokenizer(style or family_style)
    kw = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, **family_kw)
    kw.update(overrides)
    if family == "gpt_neox":
        del kw["num_key_value_heads"]  # GPT-NeoX: one KV head per query head, no such config field
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen2_sliding": "Qwen2", "mistral": "Mistral", "gemma3_text": "Gemma3Text",
            "gemma2": "Gemma2", "phi3": "Phi3", "gpt_neox": "GPTNeoX", "cohere": "Cohere", "glm": "Glm"}[family]
    config = getattr(transformers, f"{name}Config")(**kw)
    model_cls = getattr(transformers, "Gemma3ForCausalLM" if family == "gemma3_text" else f"{name}ForCausalLM")
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits; make them distinctive
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_vision(path: Path, kind: str, *, image: int = 32, patch: int = 8, hidden: int = 32, full: bool = False) -> Path:
    """A SigLIP or CLIP vision tower (``full``: the whole two-tower model, as hub repos hold it)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                              SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipVisionConfig, SiglipVisionModel)

    vkw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
               image_size=image, patch_size=patch)
    tkw = dict(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
               num_attention_heads=4, max_position_embeddings=16)
    torch.manual_seed(1)
    if kind == "siglip":
        model = (SiglipModel(SiglipConfig(text_config=tkw, vision_config=vkw)) if full
                 else SiglipVisionModel(SiglipVisionConfig(**vkw)))
        processor = SiglipImageProcessor(size={"height": image, "width": image})
    else:
        model = (CLIPModel(CLIPConfig(text_config=tkw, vision_config=vkw, projection_dim=hidden)) if full
                 else CLIPVisionModel(CLIPVisionConfig(**vkw)))
        processor = CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path




#: VideoLLM-online's LoRA targets (``arguments_live.py``): every attention/MLP projection + lm_head.
LIVE_LORA_TARGETS = "model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head$"


def save_live_checkpoint(path: Path, base_dir: Path, *, base_name: str, vision_dim: int = 32,
                         live_config: dict | None = None, seed: int = 3):
    """A VideoLLM-online-layout checkpoint: LoRA + connector (modules_to_save) over the LM in ``base_dir``.

    Mirrors ``LiveLlamaForCausalLM`` (the LM plus a ``connector`` submodule) wrapped by peft as in
    ``build_live``; ``base_name`` is written as ``base_model_name_or_path``; ``live_config`` (if given)
    becomes the checkpoint's config.json. Returns the peft model (eval mode) for reference outputs.
    """
    import json

    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    d = lm.config.hidden_size
    lm.connector = nn.Sequential(nn.Linear(vision_dim, d), nn.GELU(), nn.Linear(d, d))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=LIVE_LORA_TARGETS,
                        modules_to_save=["connector"], task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(lm, config)
    with torch.no_grad():  # "training": the saved copy of the connector differs from the initial one
        for p in model.base_model.model.connector.modules_to_save["default"].parameters():
            p.normal_(0.0, 0.3)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(path)
    if live_config is not None:
        (path / "config.json").write_text(json.dumps({"model_type": "live_llama", **live_config}))
    return model.eval()
