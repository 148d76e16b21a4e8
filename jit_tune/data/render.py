"""Conversation -> (input_ids, loss_mask) through the tokenizer's chat template.

The loss mask is built by rendering message prefixes: the tokens a turn adds to the
rendered prefix are that turn's tokens. It never looks at token ids or the pad id, so it
holds for any chat template, and it checks that each prefix tokenizes to a prefix of
the whole (a template that breaks this would silently shift the mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

TRAIN_ON = ("all_assistant", "last_assistant", "all")


class RenderError(ValueError):
    pass


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes any BOS itself; letting the tokenizer add one would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> list[int]:
    """Tokens of a prompt ready for the assistant's reply (for generation)."""
    return _render_ids(tokenizer, messages, add_generation_prompt=True)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], train_on: str = "all_assistant"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the whole conversation and a 0/1 mask of the tokens to train on.

    An assistant turn's trained span runs from the end of the prefix rendered with the
    generation prompt to the end of the prefix that includes the turn: its content and
    whatever the template closes it with (EOS).
    """
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = np.zeros(len(full), np.int32)
    if train_on == "all":
        mask[:] = 1
        return np.asarray(full, np.int32), mask
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        assistant_turns = assistant_turns[-1:]
    for i in assistant_turns:
        start = len(_checked_prefix(tokenizer, messages[:i], full, add_generation_prompt=True))
        end = len(_checked_prefix(tokenizer, messages[: i + 1], full, add_generation_prompt=False))
        mask[start:end] = 1
    return np.asarray(full, np.int32), mask


def _checked_prefix(tokenizer, messages, full: list[int], add_generation_prompt: bool) -> list[int]:
    ids = _render_ids(tokenizer, messages, add_generation_prompt)
    if full[: len(ids)] != ids:
        raise RenderError(
            f"chat template of tokenizer {tokenizer.name_or_path!r}: the rendering of the first "
            f"{len(messages)} message(s) does not tokenize to a prefix of the whole conversation, "
            "so the loss mask cannot be placed; use a template whose turns end on token boundaries"
        )
    return ids
