"""Sources and formats: every format reads into the conversation form, lazily, and bad
input names the file, line and field."""

import gzip
import json
import logging
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict

from jit_tune.data.formats import to_conversation
from jit_tune.data.sources import SourceError, open_source, task_directory
from jit_tune.data.tasks import file_tasks

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


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_byte_order_mark_and_crlf_line_endings_are_accepted(tmp_path, name):
    records = [{"prompt": f"p{i}", "completion": "é"} for i in range(3)]
    data = ("\ufeff" + "".join(json.dumps(r) + "\r\n" for r in records)).encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    source = open_source(str(tmp_path / name))
    assert [source[i] for i in range(len(source))] == [
        {**r, "_where": f"{tmp_path / name}:{i + 1}"} for i, r in enumerate(records)]
    (tmp_path / "bom_only.jsonl").write_bytes(b"\xef\xbb\xbf\r\n")
    with pytest.raises(SourceError, match="bom_only.jsonl: empty file"):
        open_source(str(tmp_path / "bom_only.jsonl"))


# The column is the 1-based character column of the line as an editor shows it: a BOM
# and the line ending are not characters of the record, a multi-byte character is one.
@pytest.mark.parametrize("text, where, error", [
    ('{"a": 1}\n{"prompt": "x", \n', 2, "Expecting property name enclosed in double quotes at column 17"),
    ('{"a": 1}\r\n{"prompt": "x", \r\n', 2, "Expecting property name enclosed in double quotes at column 17"),
    ('{"a": 1}\n{"prompt": "日本語", \n', 2, "Expecting property name enclosed in double quotes at column 19"),
    ('{"a": 1}\n{"prompt": "héllo 🦉", "completion": oops}\n', 2, "Expecting value at column 37"),
    ('{"a": 1}\n  {"prompt": 1,}\n', 2, "Expecting property name enclosed in double quotes at column 16"),
    ('{"a": 1}\n{"prompt": "unterminated\n', 2, "Unterminated string starting at column 12"),
    ('\ufeff{"prompt": x}\r\n', 1, "Expecting value at column 12"),
])
def test_malformed_json_names_the_column_in_the_line(tmp_path, text, where, error):
    path = tmp_path / "a.jsonl"
    path.write_bytes(text.encode())
    source = open_source(str(path))
    with pytest.raises(SourceError) as raised:
        source[where - 1]
    assert str(raised.value) == f"{path}:{where}: malformed JSON ({error})"


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


def _parquet(path: Path, rows: int, group: int, tag: str = "o") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"{tag}{k} " * 8 for k in range(rows)], "n": list(range(rows)),
                      "tags": [[f"t{k % 3}"] * (k % 4) for k in range(rows)],
                      "maybe": [None if k % 5 == 0 else k / 2 for k in range(rows)]})
    pq.write_table(table, path, row_group_size=group)
    return path


def test_parquet_random_order_reads_match_pyarrow(tmp_path):
    import pyarrow.parquet as pq

    path = _parquet(tmp_path / "a.parquet", rows=1000, group=128)
    assert pq.ParquetFile(path).num_row_groups == 8
    expected = pq.read_table(path).to_pylist()
    source = open_source(str(path))
    assert len(source) == 1000
    for k in np.random.default_rng(0).permutation(1000):
        assert source[int(k)] == {**expected[k], "_where": f"{path} row {k}"}


def test_parquet_shuffled_read_decodes_one_row_not_its_row_group(tmp_path):
    # A record read from a fresh row group must not build the group's 10k rows (megabytes
    # of Python objects); one row is a few hundred bytes.
    path = _parquet(tmp_path / "a.parquet", rows=40_000, group=10_000)
    source = open_source(str(path))
    tracemalloc.start()
    try:
        peaks = []
        for k in (35_123, 2_000, 27_777, 11_111):
            tracemalloc.reset_peak()
            source[k]
            peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    assert max(peaks) < 64 * 1024, peaks


def test_parquet_changed_file_is_read_again(tmp_path):
    path = _parquet(tmp_path / "a.parquet", rows=10, group=3, tag="old")
    assert open_source(str(path))[4]["text"].startswith("old4")
    _parquet(path, rows=10, group=3, tag="new")  # same size: only the mtime tells them apart
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert open_source(str(path))[4]["text"].startswith("new4")
    _parquet(path, rows=12, group=5)
    source = open_source(str(path))
    assert len(source) == 12 and source[11]["n"] == 11


def test_parquet_source_pickles_without_its_data(tmp_path):
    import pickle

    source = open_source(str(_parquet(tmp_path / "a.parquet", rows=5000, group=1000)))
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 2000 and copy[4321] == source[4321]


def _task_config(tasks: dict, task_dirs: dict) -> ConfigDict:
    return ConfigDict({"seed": 0, "data": {"tasks": tasks, "task_dirs": task_dirs, "validation_share": 0.0,
                                           "on_bad_record": "error"}})


def test_empty_template_files_in_a_task_directory_are_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "t0"
    for task in ("news", "all_empty", "qa"):
        (root / task).mkdir(parents=True)
    record = {"prompt": "Q", "completion": "A"}
    _jsonl(root / "news" / "classify.jsonl", [record] * 3)
    (root / "news" / "blank.jsonl").write_text("")
    (root / "news" / "blank_gz.jsonl.gz").write_bytes(gzip.compress(b"\n\n"))
    (root / "all_empty" / "one.jsonl").write_text("")
    (root / "all_empty" / "two.jsonl").write_text("\n")
    _jsonl(root / "qa" / "answer.jsonl", [record] * 2)
    with caplog.at_level(logging.WARNING, logger="jit_tune.data.tasks"):
        tasks = file_tasks(_task_config({}, {"t0": {"path": str(root)}}))
    assert sorted(tasks) == ["t0/news", "t0/qa"]
    assert [template for template, _ in tasks["t0/news"].templates] == ["classify"]
    assert tasks["t0/news"].size("train") == 3 and tasks["t0/qa"].size("train") == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in ("news/blank.jsonl", "news/blank_gz.jsonl.gz", "all_empty/one.jsonl", "all_empty/two.jsonl"):
        assert any(f"{root / path}: empty template file, skipped" in m for m in warned), (path, warned)
    assert any(f"{root / 'all_empty'}: every template file is empty, task t0/all_empty skipped" in m
               for m in warned), warned


def test_an_empty_standalone_task_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SourceError, match="empty.jsonl: empty file"):
        file_tasks(_task_config({"say": {"path": str(tmp_path / "empty.jsonl")}}, {}))


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
     "f.jsonl:2: field 'completion' is an int, expected a string"),
    ({"messages": [{"role": "bot", "content": "x"}], "_where": "f:1"}, "messages",
     r"f:1: messages\[0\].role = 'bot': expected one of \['assistant', 'system', 'user'\]"),
    ({"messages": "hi", "_where": "f:1"}, "messages", "f:1: field 'messages' is str, expected a non-empty list"),
    ({"messages": [{"role": ["user"], "content": "x"}], "_where": "f:1"}, "messages",
     r"f:1: messages\[0\].role = \['user'\]: expected one of"),
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
