"""Tokenizers: a byte-level BPE trained on the built-in suite (nothing to download), or
any Hugging Face tokenizer directory. Either way the result is a transformers
tokenizer carrying its chat template, saved in the workdir so that a resume, eval and
export read the same one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jit_tune.data import builtin_tasks
from jit_tune.data.chat_templates import apply_chat_template
from jit_tune.files import atomic_directory

TOKENIZER_DIR = "tokenizer"  # in a workdir
SPECIAL_TOKENS = ("<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")

# Role markers are special tokens, so a rendered prefix always ends on a token boundary;
# the assistant turn ends with EOS, which is trained, and nothing trails it.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_builtin_tokenizer(vocab_size: int, seed: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the built-in tasks' text: any byte string stays encodable."""
    return train_bpe(builtin_tasks.corpus(seed), vocab_size)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with the special tokens and chat template."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|eos|>",
        chat_template=BUILTIN_CHAT_TEMPLATE,
    )


def saved_tokenizer(workdir: str | Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer a run saved in `workdir/tokenizer`, if it has one."""
    saved = Path(workdir) / TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(saved) if saved.is_dir() else None


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, workdir: str | Path) -> None:
    """Into `workdir/tokenizer`, atomically: a resume never reads half a tokenizer."""
    with atomic_directory(Path(workdir) / TOKENIZER_DIR) as directory:
        tokenizer.save_pretrained(directory)


def build_tokenizer(name: str, vocab_size: int, seed: int, corpus: Callable[[], Iterable[str]] | None = None,
                    chat_template: str = "") -> PreTrainedTokenizerBase:
    """A tokenizer from `name`: "builtin" (BPE on the built-in tasks), "bpe" (BPE on
    `corpus()`, the training tasks' text), or a HF tokenizer dir; a named
    `chat_template` replaces the tokenizer's own."""
    if name == "builtin":
        tokenizer = train_builtin_tokenizer(vocab_size, seed)
    elif name == "bpe":
        tokenizer = train_bpe(corpus(), vocab_size)
    else:
        if not Path(name).is_dir():
            raise FileNotFoundError(
                f"config.data.tokenizer: {name!r} is neither 'builtin', 'bpe' nor a directory "
                "holding a Hugging Face tokenizer"
            )
        tokenizer = AutoTokenizer.from_pretrained(name)
    if chat_template:
        apply_chat_template(tokenizer, chat_template)
    return tokenizer
