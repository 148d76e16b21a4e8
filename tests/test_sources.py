"""Sources and formats: every format reads into the conversation form, lazily, and bad
input names the file, line and field."""

import gzip
import json
from pathlib import Path

import pytest

from jit_tune.data.formats import to_conversation
from jit_tune.data.sources import SourceError, open_source, task_directory

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_jsonl_reads_by_index_with_line_numbers_and_skips_blank_lines(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p0", "completion": "c0"}, "", {"prompt": "p1", "completion": "c1"}])
    source = open_source(str(path))
    assert len(source) == 2
    assert source[1]["prompt"] == "p1" and source[1]["_where"] == f"{path}:3"


def test_gzipped_jsonl_reads_like_plain(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    plain = _jsonl(tmp_path / "a.jsonl", records)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    gz = open_source(str(tmp_path / "b.jsonl.gz"))
    assert [gz[i]["prompt"] for i in range(len(gz))] == [r["prompt"] for r in records]
    assert gz[4]["_where"] == f"{tmp_path / 'b.jsonl.gz'}:5"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", ', r"a.jsonl:2: malformed JSON \(Expecting property name"),
    ("[1, 2]", r"a.jsonl:2: a JSON list, expected an object"),
])
def test_bad_jsonl_line_is_named(tmp_path, line, message):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "ok", "completion": "ok"}, line])
    source = open_source(str(path))
    source[0]
    with pytest.raises(SourceError, match=message):
        source[1]


def test_undecodable_text_and_empty_files_are_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(SourceError, match="a.jsonl:1: not valid UTF-8"):
        open_source(str(path))[0]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SourceError, match="empty.jsonl: empty file"):
        open_source(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(SourceError, match="bad.jsonl.gz: not a readable gzip file"):
        open_source(str(tmp_path / "bad.jsonl.gz"))
    with pytest.raises(SourceError, match="cannot tell the format"):
        open_source(str(tmp_path / "data.csv"))


def test_parquet_reads_across_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": [f"i{k}" for k in range(10)], "output": [f"o{k}" for k in range(10)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    source = open_source(str(tmp_path / "a.parquet"))
    assert len(source) == 10
    assert [source[k]["output"] for k in (9, 0, 4)] == ["o9", "o0", "o4"]
    assert source[4]["_where"].endswith("a.parquet row 4")
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="bad.parquet: not a readable Parquet file"):
        open_source(str(tmp_path / "bad.parquet"))


def test_hf_datasets_from_disk_and_from_local_files(tmp_path):
    import datasets

    rows = [{"conversations": [{"from": "human", "value": f"q{k}"}, {"from": "gpt", "value": f"a{k}"}]}
            for k in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    saved = open_source(str(tmp_path / "saved"))
    assert len(saved) == 4 and saved[2]["conversations"][1]["value"] == "a2"
    _jsonl(tmp_path / "local.jsonl", rows)
    local = open_source("json", kind="hf", data_files=str(tmp_path / "local.jsonl"))
    assert to_conversation(local[3], "sharegpt")["messages"][1] == {"role": "assistant", "content": "a3"}
    with pytest.raises(SourceError, match="cannot be read as a Hugging Face dataset"):
        open_source(str(tmp_path / "missing"), kind="hf_disk")


def test_every_format_becomes_the_conversation_form():
    user, bot = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    assert to_conversation({"prompt": "Q", "completion": "A"}, "prompt_completion")["messages"] == [user, bot]
    assert to_conversation({"prompt": "Q", "completion": "A<|endoftext|>"}, "t0")["messages"] == [user, bot]
    assert to_conversation({"q": "Q", "a": "A"}, "prompt_completion", {"prompt": "q", "completion": "a"})["messages"] \
        == [user, bot]
    alpaca = to_conversation({"instruction": "Do", "input": "this", "output": "A"}, "alpaca")["messages"]
    assert alpaca == [{"role": "user", "content": "Do\n\nthis"}, bot]
    assert to_conversation({"instruction": "Q", "input": "", "output": "A"}, "alpaca")["messages"] == [user, bot]
    chat = [{"role": "system", "content": "S"}, user, bot, user, bot]
    assert to_conversation({"messages": chat}, "messages")["messages"] == chat
    share = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    assert to_conversation({"conversations": share}, "sharegpt")["messages"] == chat[:3]


@pytest.mark.parametrize("record, fmt, message", [
    ({"prompt": "Q", "_where": "f.jsonl:7"}, "prompt_completion",
     r"f.jsonl:7: missing field 'completion' \(format prompt_completion reads prompt, completion\)"),
    ({"prompt": "Q", "completion": 3, "_where": "f.jsonl:2"}, "prompt_completion",
     "f.jsonl:2: field 'completion' is a int, expected a string"),
    ({"messages": [{"role": "bot", "content": "x"}], "_where": "f:1"}, "messages",
     r"f:1: messages\[0\].role = 'bot': expected one of \['assistant', 'system', 'user'\]"),
    ({"messages": "hi", "_where": "f:1"}, "messages", "f:1: field 'messages' is str, expected a non-empty list"),
    ({"conversations": [{"from": "gpt"}], "_where": "f:4"}, "sharegpt",
     r"f:4: conversations\[0\]: expected an object with 'from' and 'value'"),
])
def test_bad_records_name_file_line_and_field(record, fmt, message):
    with pytest.raises(SourceError, match=message):
        to_conversation(record, fmt)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is absent (a fresh clone); it holds the T0 sample")
def test_t0_directory_reads_every_task_and_template(tokenizer):
    from jit_tune.data.render import tokenize_conversation

    tasks = task_directory(SHARED / "t0_train")
    assert len(tasks) == 27 and sum(len(t) for t in tasks.values()) == 228
    total = 0
    for templates in tasks.values():
        for path in templates.values():
            total += len(open_source(str(path)))
    assert total == 44_294
    source = open_source(str(tasks["ag_news"]["classify"]))
    raw = source[0]
    assert raw["completion"].endswith("<|endoftext|>")
    conversation = to_conversation(raw, "t0")
    assert conversation["messages"][1]["content"] == raw["completion"].removesuffix("<|endoftext|>")
    ids, mask = tokenize_conversation(tokenizer, conversation["messages"])
    assert tokenizer.decode(ids[mask.astype(bool)]) == conversation["messages"][1]["content"] + "<|eos|>"
