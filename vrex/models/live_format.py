"""The LIVE text layout around frame tokens, derived from the LM's own chat template.

VideoLLM-online interleaves frames with the chat: the stream sits inside a user turn, the model
answers in an assistant turn, and the stream resumes in a new user turn. vrex renders a short
conversation with the tokenizer's chat template (``apply_chat_template``), with marker strings as
turn contents, and cuts the layout out of it, so every LM gets its own markers, role names and BOS
(the template emits it where the model expects one: Gemma, Llama 3, Mistral) without a per-family
table. For SmolLM2 (ChatML) this gives exactly the layout its connector was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

DEFAULT_SYSTEM = (
    "You are a live video assistant. Frames of a video stream arrive over time. "
    "When the scene changes, say in a few words what is shown. Answer the user's questions about the stream."
)
_U1, _A1, _U2, _A2 = "VREXUSERONE", "VREXREPLYONE", "VREXUSERTWO", "VREXREPLYTWO"


class LiveFormatError(ValueError):
    """The LM's chat template cannot express the streaming layout; the message says what is missing."""


@dataclass
class LiveFormat:
    """The interleaved LIVE text layout around frame tokens (VideoLLM-online's, in the LM's chat format).

    ::

        {prefix}<frame>{interval}<frame>{interval}<frame>      silent frames
        {respond}<generated narration>{stop}{resume}<frame>    the model chose to speak
        {ask(question)}<generated answer>{stop}{resume}<frame> a user question at time t

    ``interval`` is the streaming-EOS label: after a frame, P(interval) >= theta means stay silent.
    The first token of ``respond`` is what training teaches the model to predict when it should speak.
    """

    prefix: str
    interval: str
    respond: str
    question: str  # contains "{question}"
    resume: str
    stop: str

    @staticmethod
    def for_tokenizer(tokenizer: PreTrainedTokenizerBase, system: str = DEFAULT_SYSTEM) -> "LiveFormat":
        """The layout from the tokenizer's chat template; without one, VideoLLM-online's plain layout
        (``{bos}{system}\\n[`` frames ``]\\nAssistant:`` ...), BOS included when the tokenizer adds one.
        Raises :class:`LiveFormatError` for a template that cannot express it."""
        if getattr(tokenizer, "chat_template", None):
            return from_chat_template(tokenizer, system)
        eos = tokenizer.eos_token
        if eos is None:
            raise LiveFormatError("the tokenizer has neither a chat template nor an eos_token: vrex cannot tell where "
                                  "a reply ends")
        bos = tokenizer.bos_token or ""
        adds_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        return LiveFormat(prefix=f"{bos if adds_bos else ''}{system}\n[", interval=",", respond="]\nAssistant:",
                          question="]\nUser: {question}\nAssistant:", resume="\n[", stop=eos)


def _render(tokenizer: PreTrainedTokenizerBase, system: str) -> str:
    turns = [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
             {"role": "user", "content": _U2}, {"role": "assistant", "content": _A2}]
    errors = []
    for messages in ([{"role": "system", "content": system}] + turns,
                     # templates without a system role (Mistral's [INST]): the system text opens the first turn
                     [{"role": "user", "content": f"{system}\n\n{_U1}"}] + turns[1:]):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # jinja's raise_exception, TemplateError: the template refused these turns
            errors.append(f"{err.__class__.__name__}: {err}")
    raise LiveFormatError(f"the chat template cannot render system/user/assistant turns ({'; '.join(errors)})")


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, between: str) -> str:
    """The special token that ends an assistant turn: the longest special token ``between`` starts with."""
    specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    found = [s for s in specials if s and between.startswith(s)]
    if not found:
        raise LiveFormatError(
            f"the chat template ends an assistant turn with {between!r}, which does not start with a special token; "
            f"vrex needs one end-of-turn token to stop a reply")
    return max(found, key=len)


def from_chat_template(tokenizer: PreTrainedTokenizerBase, system: str = DEFAULT_SYSTEM) -> LiveFormat:
    """Cut the LIVE layout out of a rendered two-exchange conversation (see the module docstring)."""
    text = _render(tokenizer, system)
    try:
        u1, a1, u2, a2 = (text.index(m) for m in (_U1, _A1, _U2, _A2))
    except ValueError:
        raise LiveFormatError("the chat template drops or rewrites message contents; vrex cannot place frames "
                              "inside a user turn") from None
    if system.strip() and system.strip() not in text[:u1]:
        raise LiveFormatError("the chat template drops the system prompt")
    prefix = text[:u1]
    respond = text[u1 + len(_U1):a1]
    between = text[a1 + len(_A1):u2]
    if text[u2 + len(_U2):a2] != respond:
        raise LiveFormatError(f"the chat template opens assistant turns differently ({respond!r} then "
                              f"{text[u2 + len(_U2):a2]!r}); vrex needs one layout for every reply")
    if not respond:
        raise LiveFormatError("the chat template puts nothing between a user turn and the reply: the model could "
                              "not signal that it speaks")
    stop = _end_of_turn(tokenizer, between)
    return LiveFormat(prefix=prefix, interval=",", respond=respond, question="\n{question}" + respond,
                      resume=between[len(stop):], stop=stop)
