"""Record formats, each turned into the one internal conversation form:
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "_where": ...}`.

Field names are mapped by the config (`fields`), so a dataset that calls its prompt
"question" needs no preprocessing. A missing field or a wrong type is a SourceError
naming the record's file and line, the field and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping

from jit_tune.data.sources import SourceError, a_type

# The T0/P3 dumps end every completion with this GPT-3-era marker; it is not the answer.
T0_END_MARKER = "<|endoftext|>"
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
DEFAULT_FIELDS = {
    "prompt_completion": {"prompt": "prompt", "completion": "completion"},
    "t0": {"prompt": "prompt", "completion": "completion"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "messages": {"messages": "messages"},
    "sharegpt": {"conversations": "conversations"},
}
FORMATS = tuple(DEFAULT_FIELDS)
# "templated": raw-field records rendered by the task's FLAN-style templates (templates.py).
TASK_FORMATS = FORMATS + ("templated",)
# The keys of a task spec (config.data.tasks.<name>, config.data.task_dirs.<prefix>) and their defaults.
FILE_TASK_FIELDS = {"path": None, "kind": "auto", "format": "prompt_completion", "fields": {}, "split": "train",
                    "data_files": None, "templates": None}
TASK_DIR_FIELDS = {"path": None, "format": "t0", "fields": {}}


def task_spec(spec: Mapping, defaults: dict, where: str) -> dict:
    """A task spec with its defaults filled in, checked before any file is opened:
    known keys, a path, a known format, and `fields` mapping that format's field names
    to the record's keys (a templated task's templates name the record's keys
    themselves)."""
    values = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise SourceError(f"{where}: unknown keys {unknown}; expected some of {sorted(defaults)}")
    merged = {**defaults, **values}
    if not isinstance(merged["path"], str) or not merged["path"]:
        raise SourceError(f"{where}: 'path' = {merged['path']!r}: expected a file or directory path")
    fmt, fields = merged["format"], merged["fields"]
    formats = TASK_FORMATS if "templates" in defaults else FORMATS
    if fmt not in formats:
        raise SourceError(f"{where}.format = {fmt!r}: expected one of {', '.join(formats)}")
    if fmt == "templated" and merged["templates"] is None:
        raise SourceError(f"{where}: format 'templated' needs 'templates'")
    if fmt != "templated" and merged.get("templates") is not None:
        raise SourceError(f"{where}.templates: only format 'templated' uses templates (format is {fmt!r})")
    names = DEFAULT_FIELDS.get(fmt, {})
    if not isinstance(fields, Mapping) or set(fields) - set(names) or not all(
            isinstance(v, str) for v in fields.values()):
        expected = (f"a dict from some of {sorted(names)} to the record's keys" if names else
                    "{} (templates name the record's keys)")
        raise SourceError(f"{where}.fields = {fields!r}: expected {expected}")
    return merged


def _field(record: Mapping, fields: Mapping, name: str, fmt: str, optional: bool = False):
    key = fields.get(name, name)
    if key not in record or record[key] is None:
        if optional:
            return None
        expected = ", ".join(DEFAULT_FIELDS[fmt].values())
        raise SourceError(f"{record.get('_where', '?')}: missing field {key!r} (format {fmt} reads {expected})")
    return record[key]


def _text(record: Mapping, fields: Mapping, name: str, fmt: str, optional: bool = False) -> str | None:
    value = _field(record, fields, name, fmt, optional)
    if value is not None and not isinstance(value, str):
        key = fields.get(name, name)
        raise SourceError(f"{record.get('_where', '?')}: field {key!r} is {a_type(value)}, expected a string")
    return value


def _turns(record: Mapping, turns, key: str, role_key: str, text_key: str, roles: Mapping) -> list[dict]:
    where = record.get("_where", "?")
    if not isinstance(turns, list) or not turns:
        raise SourceError(f"{where}: field {key!r} is {type(turns).__name__}, expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or text_key not in turn:
            raise SourceError(f"{where}: {key}[{i}]: expected an object with {role_key!r} and {text_key!r}")
        if not isinstance(turn[role_key], str) or turn[role_key] not in roles:
            raise SourceError(f"{where}: {key}[{i}].{role_key} = {turn[role_key]!r}: expected one of {sorted(roles)}")
        if not isinstance(turn[text_key], str):
            raise SourceError(f"{where}: {key}[{i}].{text_key} is {a_type(turn[text_key])}, expected a string")
        messages.append({"role": roles[turn[role_key]], "content": turn[text_key]})
    return messages


def to_conversation(record: Mapping, fmt: str, fields: Mapping | None = None) -> dict:
    """The conversation form of one record in format `fmt`."""
    fields = fields or {}
    if fmt in ("prompt_completion", "t0"):
        prompt = _text(record, fields, "prompt", fmt)
        completion = _text(record, fields, "completion", fmt)
        if fmt == "t0":
            completion = completion.removesuffix(T0_END_MARKER)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "alpaca":
        instruction = _text(record, fields, "instruction", fmt)
        extra = _text(record, fields, "input", fmt, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(record, fields, "output", fmt)}]
    elif fmt == "messages":
        key = fields.get("messages", "messages")
        roles = {r: r for r in ("system", "user", "assistant")}
        messages = _turns(record, _field(record, fields, "messages", fmt), key, "role", "content", roles)
    elif fmt == "sharegpt":
        key = fields.get("conversations", "conversations")
        messages = _turns(record, _field(record, fields, "conversations", fmt), key, "from", "value", _SHAREGPT_ROLES)
    else:
        raise SourceError(f"format {fmt!r}: expected one of {FORMATS}")
    return {"messages": messages, "_where": record.get("_where", "?")}
