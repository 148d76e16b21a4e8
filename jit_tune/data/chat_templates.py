"""Named chat templates, for tokenizers that carry none or a different one.

Every template puts turn separators before a turn, never after an assistant turn, so
the trained span of a reply is exactly its content and the end-of-turn token; and each
rendered prefix is a prefix of the whole (render.py checks it).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# name -> (template, end-of-turn token that becomes the tokenizer's EOS, or None: keep EOS)
TEMPLATES = {
    "plain": (
        "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '\\n\\n' }}{% endif %}",
        None,
    ),
    "alpaca": (
        "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] }}"
        "{% else %}{{ '### Response:\\n' + m['content'] + eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}",
        None,
    ),
    "chatml": (
        "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}",
        "<|im_end|>",
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}",
        "<|eot_id|>",
    ),
}
_MARKERS = {"chatml": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """Set a named template; its markers become special tokens (so they tokenize as one
    token each) and its end-of-turn token becomes EOS, where generation stops."""
    if name not in TEMPLATES:
        raise ValueError(f"config.data.chat_template = {name!r}: expected '' (the tokenizer's own) or one of "
                         f"{', '.join(TEMPLATES)}")
    template, end_of_turn = TEMPLATES[name]
    missing = [m for m in _MARKERS.get(name, []) if m not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if end_of_turn:
        tokenizer.eos_token = end_of_turn
    tokenizer.chat_template = template
    return tokenizer
