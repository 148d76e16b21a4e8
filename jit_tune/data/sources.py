"""Record sources with random access: JSONL (also gzipped), Parquet, Hugging Face datasets.

Each source is a Grain random-access data source (`len`, `[i]`) yielding plain dicts,
so mixtures, per-host sharding and exact resume work the same for every format. Files
are never loaded whole: JSONL is indexed by line offsets once and read line by line,
Parquet is converted once to a memory-mapped Arrow file, and `datasets` memory-maps its
Arrow files. Every record carries `_where` ("file:line" or "file row N"), so a later
error can name where it came from.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

SOURCE_KINDS = ("jsonl", "parquet", "hf_disk", "hf")


class SourceError(ValueError):
    """Bad input: the message names the file, the line (or row) and what was expected."""


def a_type(value) -> str:
    """'an int', 'a list': the type of a value a message says was found."""
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


class EmptySourceError(SourceError):
    """A file or dataset with no records (a task directory skips these; see tasks.py)."""


class JsonlSource:
    """One JSON object per line. A .gz file is decompressed once into a cache file
    (gzip has no random access); the index holds one offset per line, not the data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such file")
        self._file = _cached(self.path, "gunzip", _gunzip) if self.path.suffix == ".gz" else self.path
        offsets, line_numbers = [], []
        with open(self._file, "rb") as f:
            # A UTF-8 byte-order mark (Windows tools write one) is not part of the first record.
            position = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
            f.seek(position)
            for number, line in enumerate(f, 1):
                if line.strip():  # blank lines are not records
                    offsets.append(position)
                    line_numbers.append(number)
                position += len(line)
        self._offsets = np.asarray(offsets, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)
        if not len(self._offsets):
            raise EmptySourceError(f"{self.path}: empty file: expected one JSON object per line")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        with open(self._file, "rb") as f:
            f.seek(int(self._offsets[index]))
            raw = f.readline()
        where = f"{self.path}:{self._line_numbers[index]}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{where}: not valid UTF-8 (byte {e.start}): expected UTF-8 text") from None
        try:
            # Parsed without its line ending: with it, an error at the end of the line (a
            # truncated record) is placed past the newline, at "line 2, column 1".
            record = json.loads(text.removesuffix("\n").removesuffix("\r"))
        except json.JSONDecodeError as e:  # colno: 1-based, in characters (the text is decoded)
            message = e.msg.removesuffix(" at")  # "Unterminated string starting at" + " at column"
            raise SourceError(f"{where}: malformed JSON ({message} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: a JSON {type(record).__name__}, expected an object")
        record["_where"] = where
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r})"


def _cached(path: Path, kind: str, write) -> Path:
    """A file made from `path` by `write(path, out)` once, kept in the temp dir under a key
    of the path, size and mtime, so a changed file is converted again, never served stale."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"jit_tune_{kind}" / f"{path.stem}.{key}"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.parent / f"{cache.name}.{os.getpid()}.partial"
        try:
            write(path, partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(cache)  # atomic: a concurrent reader never sees half a file
    return cache


def _gunzip(path: Path, out: Path) -> None:
    try:
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{path}: not a readable gzip file ({e})") from None


def _parquet_to_arrow(parquet_file, path: Path, out: Path) -> None:
    """One row group in memory at a time; uncompressed, so the result can be memory-mapped."""
    import pyarrow as pa

    try:
        with pa.ipc.new_file(str(out), parquet_file.schema_arrow) as writer:
            for group in range(parquet_file.num_row_groups):
                writer.write_table(parquet_file.read_row_group(group))
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None


class ParquetSource:
    """Rows of a Parquet file. Parquet decodes a row group (thousands of rows) at a time,
    so shuffled reads straight from it cost a row group per record. Instead the file is
    converted once into an uncompressed Arrow IPC file (see `_cached`) and memory-mapped:
    a record costs a one-row slice in any order, and the data is paged in from that file
    rather than held on the heap."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such file")
        try:
            parquet_file = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise SourceError(f"{self.path}: not a readable Parquet file ({e})") from None
        with parquet_file:
            if parquet_file.metadata.num_rows == 0:
                raise EmptySourceError(f"{self.path}: empty file: no rows")
            self._arrow = _cached(self.path, "parquet", functools.partial(_parquet_to_arrow, parquet_file))
        self._map()

    def _map(self) -> None:
        import pyarrow as pa

        self._table = pa.ipc.open_file(pa.memory_map(str(self._arrow))).read_all()

    def __getstate__(self) -> dict:
        # Grain worker processes map the file themselves rather than unpickle a copy of the data.
        return {"path": self.path, "_arrow": self._arrow}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> dict:
        record = self._table.slice(int(index), 1).to_pylist()[0]
        record["_where"] = f"{self.path} row {index}"
        return record

    def __repr__(self) -> str:
        return f"ParquetSource({str(self.path)!r})"


class HFDatasetSource:
    """A `datasets.Dataset` (Arrow, memory-mapped): `load_from_disk(path)` for kind
    "hf_disk", or `load_dataset(path, data_files=..., split=...)` on local files for "hf"."""

    def __init__(self, path: str, kind: str = "hf_disk", split: str = "train", data_files: str | None = None):
        import datasets

        self.path = path
        try:
            if kind == "hf_disk":
                dataset = datasets.load_from_disk(path)
            else:
                dataset = datasets.load_dataset(path, data_files=data_files, split=split)
        except (FileNotFoundError, ValueError) as e:
            raise SourceError(f"{path}: cannot be read as a Hugging Face dataset ({e})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise SourceError(f"{path}: no split {split!r}; expected one of {sorted(dataset)}")
            dataset = dataset[split]
        if len(dataset) == 0:
            raise EmptySourceError(f"{path}: empty dataset: no rows")
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._dataset[int(index)])
        record["_where"] = f"{self.path} row {index}"
        return record

    def __repr__(self) -> str:
        return f"HFDatasetSource({self.path!r})"


def open_source(path: str, kind: str = "auto", split: str = "train", data_files: str | None = None):
    """The source for `path`; kind "auto" picks by suffix (.jsonl, .jsonl.gz, .parquet,
    or a directory saved with `Dataset.save_to_disk`)."""
    if kind == "auto":
        name = str(path)
        if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            kind = "jsonl"
        elif name.endswith(".parquet"):
            kind = "parquet"
        elif Path(path).is_dir():
            kind = "hf_disk"
        else:
            raise SourceError(f"{path}: cannot tell the format from the name; set kind to one of {SOURCE_KINDS}")
    if kind == "jsonl":
        return JsonlSource(path)
    if kind == "parquet":
        return ParquetSource(path)
    if kind in ("hf_disk", "hf"):
        return HFDatasetSource(path, kind, split, data_files)
    raise SourceError(f"{path}: kind {kind!r}: expected 'auto' or one of {SOURCE_KINDS}")


def task_directory(root: str | Path) -> dict[str, dict[str, Path]]:
    """FLAN/T0-style layout `root/<task>/<template>.jsonl[.gz]`: {task: {template: file}}."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: no such directory (expected <task>/<template>.jsonl files)")
    tasks = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in task_dir.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if files:
            tasks[task_dir.name] = {p.name.split(".jsonl")[0]: p for p in files}
    if not tasks:
        raise SourceError(f"{root}: no <task>/<template>.jsonl files found")
    return tasks
