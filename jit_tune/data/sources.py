"""Record sources with random access: JSONL (also gzipped), Parquet, Hugging Face datasets.

Each source is a Grain random-access data source (`len`, `[i]`) yielding plain dicts,
so mixtures, per-host sharding and exact resume work the same for every format. Files
are never loaded whole: JSONL is indexed by line offsets once and read line by line,
Parquet by row group, and `datasets` memory-maps its Arrow files. Every record carries
`_where` ("file:line" or "file row N"), so a later error can name where it came from.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SOURCE_KINDS = ("jsonl", "parquet", "hf_disk", "hf")


class SourceError(ValueError):
    """Bad input: the message names the file, the line (or row) and what was expected."""


class JsonlSource:
    """One JSON object per line. A .gz file is decompressed once into a cache file
    (gzip has no random access); the index holds one offset per line, not the data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such file")
        self._file = _decompressed(self.path) if self.path.suffix == ".gz" else self.path
        offsets, line_numbers, position = [], [], 0
        with open(self._file, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():  # blank lines are not records
                    offsets.append(position)
                    line_numbers.append(number)
                position += len(line)
        self._offsets = np.asarray(offsets, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)
        if not len(self._offsets):
            raise SourceError(f"{self.path}: empty file: expected one JSON object per line")

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
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: a JSON {type(record).__name__}, expected an object")
        record["_where"] = where
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r})"


def _decompressed(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "jit_tune_gunzip" / f"{path.stem}.{key}"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.partial")
        try:
            with gzip.open(path, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:
            partial.unlink(missing_ok=True)
            raise SourceError(f"{path}: not a readable gzip file ({e})") from None
        partial.replace(cache)  # atomic: a concurrent reader never sees half a file
    return cache


class ParquetSource:
    """Rows of a Parquet file, reading one row group at a time (the last one is kept)."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such file")
        try:
            self._file = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise SourceError(f"{self.path}: not a readable Parquet file ({e})") from None
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.cumsum([0] + sizes)
        if self._starts[-1] == 0:
            raise SourceError(f"{self.path}: empty file: no rows")
        self._cached = (None, None)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict:
        group = int(np.searchsorted(self._starts, index, side="right") - 1)
        if self._cached[0] != group:
            self._cached = (group, self._file.read_row_group(group).to_pylist())
        record = dict(self._cached[1][index - self._starts[group]])
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
            raise SourceError(f"{path}: empty dataset: no rows")
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
