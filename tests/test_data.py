import numpy as np
import pytest

from jit_tune.data.registry import build_registry
from jit_tune.data import builtin_tasks as bt
from jit_tune.data.pipeline import ROW_FEATURES, train_dataset
from jit_tune.data.render import RenderError, tokenize_conversation


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse: owl cake"},
    {"role": "assistant", "content": "cake owl"},
    {"role": "user", "content": "Count: owl cake"},
    {"role": "assistant", "content": "2"},
]


def _trained_text(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask.astype(bool)])


def test_loss_mask_covers_exactly_the_response_and_its_eos(tokenizer):
    for task in bt.TASKS:
        example = bt.make_example(task, "train", 0, seed=0)
        ids, mask = tokenize_conversation(tokenizer, example["messages"])
        answer = example["messages"][-1]["content"]
        assert _trained_text(tokenizer, ids, mask) == answer + tokenizer.eos_token
        # the trained span is one contiguous block at the end, closed by EOS
        trained = np.flatnonzero(mask)
        assert trained[-1] == len(ids) - 1 and ids[-1] == tokenizer.eos_token_id
        assert np.all(np.diff(trained) == 1)
        assert _trained_text(tokenizer, ids, 1 - mask).endswith("<|assistant|>")


def test_every_assistant_turn_is_trained_in_multi_turn(tokenizer):
    messages = MULTI_TURN
    ids, mask = tokenize_conversation(tokenizer, messages)
    assert _trained_text(tokenizer, ids, mask) == "cake owl<|eos|>2<|eos|>"
    ids, mask = tokenize_conversation(tokenizer, messages, train_on="last_assistant")
    assert _trained_text(tokenizer, ids, mask) == "2<|eos|>"
    ids, mask = tokenize_conversation(tokenizer, messages, train_on="all")
    assert mask.all()


def test_template_that_breaks_prefixes_is_named(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|eos|>", pad_token="<|pad|>")
    # The generation prompt writes a marker the finished conversation does not contain.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT SAYS: ' }}{% endif %}"
    )
    tok.name_or_path = "broken-template"
    with pytest.raises(RenderError, match="'broken-template'.*does not tokenize to a prefix"):
        tokenize_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_rows_are_packed_with_restarting_positions_and_no_cross_segment_targets(tokenizer, smoke_config):
    batch = next(iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config))))
    assert set(batch) == set(ROW_FEATURES)
    seq_len = smoke_config.data.seq_len
    assert batch["inputs"].shape == (smoke_config.data.batch_size, seq_len)
    assert (batch["segment_ids"].max(axis=1) > 1).all(), "rows should hold several examples"
    for row in range(batch["inputs"].shape[0]):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(pos[where], np.arange(len(where)))
            # the last target of a segment is its EOS: nothing is predicted across segments
            assert batch["targets"][row, where[-1]] == tokenizer.eos_token_id
        assert not batch["loss_mask"][row][seg == 0].any()


@pytest.mark.parametrize("name", ["plain", "alpaca", "chatml", "llama3"])
def test_named_chat_templates_train_exactly_each_reply_and_its_end_token(name):
    from jit_tune.data.chat_templates import apply_chat_template
    from jit_tune.data.render import prompt_ids
    from jit_tune.data.tokenizer import train_builtin_tokenizer

    tokenizer = apply_chat_template(train_builtin_tokenizer(400, seed=0), name)
    messages = MULTI_TURN
    ids, mask = tokenize_conversation(tokenizer, messages)
    eos = tokenizer.eos_token
    assert tokenizer.decode(ids[mask.astype(bool)]) == f"cake owl{eos}2{eos}"
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1
    assert list(ids[: len(prompt_ids(tokenizer, messages[:2]))]) == prompt_ids(tokenizer, messages[:2])
    if name == "llama3":
        assert tokenizer.decode(ids[:1]) == "<|begin_of_text|>" and tokenizer.decode(ids[1:2]) != "<|begin_of_text|>"


def test_unknown_chat_template_is_named():
    from jit_tune.data.chat_templates import apply_chat_template
    from jit_tune.data.tokenizer import train_builtin_tokenizer

    with pytest.raises(ValueError, match="chat_template = 'vicuna': expected '' .* or one of plain, alpaca"):
        apply_chat_template(train_builtin_tokenizer(300, seed=0), "vicuna")
