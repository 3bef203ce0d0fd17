"""Chat rendering for instruct models: the edit prompt as a user turn, the answer as the assistant's reply.

The tokenizer's own chat template (``tokenizer.chat_template``) decides the text. It is rendered once with
placeholder messages and cut around them, so 100K edits cost string joins rather than 200K template
renderings; the first prompt and answer of every call are also rendered for real and compared, and a
template that rewrites message text (trimming, escaping) is rendered per edit instead.

The reply part of a training example is what the template writes after the generation prompt for an
assistant message: any fixed head the template puts before the content, the answer, and the turn's end
up to and including its first special token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), which is the token
that stops generation. The template's text after that token (a newline) is not a target.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from locft_dist.errors import ConfigError, EncodingError

logger = logging.getLogger(__name__)

_USER = "\u2063LOCFT_USER_MESSAGE\u2063"
_ASSISTANT = "\u2063LOCFT_ASSISTANT_MESSAGE\u2063"


def _render(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises its own errors (e.g. raise_exception in the template)
        raise EncodingError(f"the tokenizer's chat template failed to render {messages!r}: {err}") from err


def _split_once(text: str, marker: str, what: str) -> tuple[str, str]:
    parts = text.split(marker)
    if len(parts) != 2:
        raise EncodingError(
            f"the chat template writes the {what} {len(parts) - 1} times, not once; "
            "it cannot be used with edits.chat_template=auto"
        )
    return parts[0], parts[1]


@dataclass(frozen=True)
class ChatTemplate:
    """The fixed text around a user turn and around the assistant's reply, as the template renders them."""

    prompt_head: str
    """Everything before the user message (system turn, BOS if the template writes one)."""
    prompt_tail: str
    """After the user message, up to and including the generation prompt (``<|im_start|>assistant\\n``)."""
    reply_head: str
    """What the template writes in the assistant turn before its content (usually nothing)."""
    reply_tail: str
    """Everything the template writes after the assistant's content (``<|im_end|>\n``)."""
    end_of_turn: str
    """What ends a training reply: ``reply_tail`` up to and including its first special token (or EOS)."""

    @classmethod
    def of(cls, tokenizer) -> ChatTemplate:
        """The template of ``tokenizer``; a tokenizer without one is a ConfigError."""
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                f"edits.chat_template=auto, but the tokenizer of {name!r} has no chat template; use "
                "edits.chat_template=none (plain completion) or a model directory whose tokenizer has one "
                "(chat_template in tokenizer_config.json, or chat_template.jinja)"
            )
        user = [{"role": "user", "content": _USER}]
        prompt = _render(tokenizer, user, generation_prompt=True)
        head, tail = _split_once(prompt, _USER, "user message")
        full = _render(
            tokenizer, [*user, {"role": "assistant", "content": _ASSISTANT}], generation_prompt=False
        )
        if not full.startswith(prompt):
            raise EncodingError(
                "the chat template renders a conversation with the assistant's reply differently from its "
                "generation prompt, so prompt and reply cannot be split; use edits.chat_template=none"
            )
        reply_head, after = _split_once(full[len(prompt) :], _ASSISTANT, "assistant message")
        return cls(head, tail, reply_head, after, _end_of_turn(tokenizer, after))

    def prompt_text(self, prompt: str) -> str:
        return self.prompt_head + prompt + self.prompt_tail

    def reply_text(self, answer: str, *, end_turn: bool) -> str:
        return self.reply_head + answer + (self.end_of_turn if end_turn else "")

    def prompt_texts(self, tokenizer, prompts: Sequence[str]) -> list[str]:
        """Rendered user turns with the generation prompt; checked against a real rendering."""
        texts = [self.prompt_text(p) for p in prompts]
        if texts:
            real = _render(tokenizer, [{"role": "user", "content": prompts[0]}], generation_prompt=True)
            if real != texts[0]:
                logger.warning("the chat template rewrites message text: rendering every prompt (slower)")
                texts = [
                    _render(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
                    for p in prompts
                ]
        return texts

    def reply_texts(
        self, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, end_turn: bool
    ) -> list[str]:
        """The assistant reply of each answer (ending the turn when ``end_turn``); checked as above."""
        texts = [self.reply_text(a, end_turn=end_turn) for a in answers]
        if texts and self._reply_of(tokenizer, prompts[0], answers[0], end_turn) != texts[0]:
            logger.warning("the chat template rewrites message text: rendering every reply (slower)")
            texts = [self._reply_of(tokenizer, p, a, end_turn) for p, a in zip(prompts, answers, strict=True)]
        return texts

    def _reply_of(self, tokenizer, prompt: str, answer: str, end_turn: bool) -> str:
        user = [{"role": "user", "content": prompt}]
        head = _render(tokenizer, user, generation_prompt=True)
        full = _render(tokenizer, [*user, {"role": "assistant", "content": answer}], generation_prompt=False)
        if not full.startswith(head):
            raise EncodingError(f"the chat template renders the reply to {prompt!r} apart from its prompt")
        reply = full[len(head) :]
        if not reply.endswith(self.reply_tail):
            raise EncodingError(f"the chat template's reply to {prompt!r} does not end its turn as expected")
        content = reply[: len(reply) - len(self.reply_tail)]
        return content + self.end_of_turn if end_turn else content


def _end_of_turn(tokenizer, after_content: str) -> str:
    """The text after the reply's content up to and including its first special token.

    A template that writes no special token after the reply ends it with the tokenizer's EOS instead.
    """
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=lambda t: -len(t))
    first = None
    for token in specials:
        index = after_content.find(token)
        if index >= 0 and (first is None or index < first[0]):
            first = (index, token)
    if first is not None:
        return after_content[: first[0] + len(first[1])]
    if tokenizer.eos_token:
        logger.warning(
            "the chat template ends the assistant turn with %r (no special token): replies end with EOS %r",
            after_content,
            tokenizer.eos_token,
        )
        return tokenizer.eos_token
    raise EncodingError("the chat template ends the assistant turn with no special token and there is no EOS")
