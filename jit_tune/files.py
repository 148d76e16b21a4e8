"""Files a command leaves behind are whole or absent, and written by one process.

Every file and directory in a workdir (config, tokenizer, eval results, exports) is
written to a temporary name next to its destination and renamed into place, so a kill
at any moment leaves either the old version or the new one, never half of one. In a
multi-process run only process 0 writes shared files; `written_by_main` makes the
others wait until the files exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path



def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove_abandoned(path: Path) -> None:
    """Temporary siblings of `path` left by processes that were killed while writing."""
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def named_as(path: str | Path, *unnamed: str) -> Iterator[None]:
    """An OSError raised in the block names `path`, the file the user knows, when it named
    none (a write's error) or one of `unnamed` (a temporary file): a full disk is then
    reported with the file it refused."""
    try:
        yield
    except OSError as e:
        if e.filename not in (None, *unnamed):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    temporary = _temporary(path)
    try:
        with named_as(path, str(temporary)):
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json(path: str | Path, advice: str = "", keys: tuple[str, ...] = ()) -> dict:
    """A JSON object jit_tune wrote (or a person edited), with `keys` at its top level;
    one that does not parse, or is not such an object, is a ConfigError naming the file
    (and line and column), and is left as it is."""
    from jit_tune.config import ConfigError

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{path}{why}; the file was left as it is" + (f": {advice}" if advice else ""))

    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise refuse(f":{e.lineno}: not valid JSON ({e.msg} at column {e.colno})" if isinstance(
            e, json.JSONDecodeError) else f": not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(value, dict):
        raise refuse(f": expected a JSON object ({{...}}), found {type(value).__name__}")
    missing = [key for key in keys if key not in value]
    if missing:
        raise refuse(f": expected the field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}, which "
                     "jit_tune writes there; not found")
    return value


def atomic_write_json(path: str | Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


# Written into every directory jit_tune replaces whole (export, convert): only a directory
# holding it may be replaced, so a model directory that merely looks like an export (a
# run's own init_from, say) is never deleted by one.
OUTPUT_MARKER = ".jit_tune_output"


def replaceable_output(out: Path, kind: str) -> str | None:
    """Why `out` may not be replaced by a new `kind` ("export", "conversion"), or None:
    it must not exist, be an empty directory, or hold an earlier one (its marker)."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: is a file; give a directory"
    if out.is_dir() and any(out.iterdir()) and not (out / OUTPUT_MARKER).is_file():
        return (f"--out {out}: exists and is not an earlier jit_tune {kind} (it has no {OUTPUT_MARKER}); "
                "give a new directory")
    return None


def mark_output(directory: Path, kind: str) -> None:
    (directory / OUTPUT_MARKER).write_text(json.dumps({"written_by": f"jit-tune {kind}"}) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory to fill; on success it replaces `path` (an existing
    one is moved aside first and removed only once the new one is in place); on an
    error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    temporary = _temporary(path)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(temporary, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def no_empty_folders_on_error(*paths: Path) -> Iterator[None]:
    """A command that fails leaves no trace: those of `paths` (children after parents)
    that did not exist before the block and are empty when it raises are removed."""
    new = [Path(p) for p in paths if not Path(p).exists()]
    try:
        yield
    except BaseException:
        for path in reversed(new):
            with contextlib.suppress(OSError):  # not empty (another process wrote there): kept
                path.rmdir()
        raise


def is_main_process() -> bool:
    import jax  # here, so that writing a file does not load JAX (plotting, tools)

    return jax.process_index() == 0


@contextlib.contextmanager
def written_by_main(name: str) -> Iterator[bool]:
    """`with written_by_main("tokenizer") as writer: if writer: ...write...`: process 0
    writes, and no process leaves the block before the files exist."""
    import jax
    from jax.experimental import multihost_utils

    try:
        yield is_main_process()
    finally:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jit_tune: {name} written")
