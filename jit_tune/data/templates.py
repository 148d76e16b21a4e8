"""FLAN-style templates that turn raw-field records into instructions.

A task whose records are raw fields (`{"review": ..., "label": ...}`) carries several
(prompt, completion) templates, Jinja or Python format strings over the record's fields.
Every example is rendered by one of them, chosen by a hash of (seed, task, record, epoch):
deterministic, so resumes and hosts agree, and different in every epoch, as FLAN's
random template sampling is. On top of the template, as in FLAN 2022:

- answer options: `options` (a fixed list) or `options_field` (a list per record) are
  offered to templates as `options` and as FLAN's rendered `options_` block;
- few-shot: a share of examples gets 1..`shots` exemplars from the same task's train
  split, rendered by the same template and joined by `separator`, before the prompt;
- input inversion: a share of examples is rendered by the `inverted` templates, which ask
  for the input given the output;
- held-out templates: the last `held_out` templates are never trained on and are what the
  evaluator's held_out column scores, as for the built-in suite.
"""

from __future__ import annotations

import dataclasses
import re
import string
import zlib
from collections.abc import Callable, Mapping, Sequence

import jinja2
import jinja2.meta
import numpy as np

from jit_tune.data.sources import SourceError, a_type

TEMPLATE_FIELDS = {
    "templates": None,  # [(prompt, completion) | {"name", "prompt", "completion"}, ...]
    "syntax": "jinja",  # "jinja": {{field}}; "format": {field}
    "options": None,
    "options_field": None,
    "few_shot_share": 0.0,
    "shots": 3,
    "separator": "\n\n",
    "inverted": [],
    "invert_share": 0.0,
    "held_out": 0,
}
SYNTAXES = ("jinja", "format")
_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def few_shot_prompt(exemplars: Sequence[tuple[str, str]], prompt: str, separator: str = "\n\n") -> str:
    """FLAN's few-shot format: each exemplar as `prompt\nanswer`, then the prompt, joined
    by `separator`, all in one user turn."""
    return separator.join([f"{p}\n{a}" for p, a in exemplars] + [prompt])


def options_block(options: Sequence[str]) -> str:
    """FLAN's rendering of answer options."""
    return "OPTIONS:\n" + "\n".join(f"- {option}" for option in options)


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    prompt: Callable[[Mapping], str]
    completion: Callable[[Mapping], str]


def _compile(text, syntax: str, where: str) -> Callable[[Mapping], str]:
    """The template's render function. A template that reads no field renders the same
    text for every record, most often a field written in the other syntax: refused."""
    if not isinstance(text, str):
        raise SourceError(f"{where}: is {a_type(text)}, expected a template string")
    if syntax == "jinja":
        try:
            reads = jinja2.meta.find_undeclared_variables(_JINJA.parse(text))
        except jinja2.TemplateSyntaxError as e:
            raise SourceError(f"{where}: Jinja syntax error on its line {e.lineno}: {e.message}") from None
        other = re.search(r"(?<!\{)\{\w+\}(?!\})", text)
    else:
        try:
            reads = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        except ValueError as e:
            raise SourceError(f"{where}: format string error: {e}") from None
        other = re.search(r"\{\{\s*\w+\s*\}\}", text)
    if not reads:
        hint = (f"; {other.group()} is the {'format' if syntax == 'jinja' else 'jinja'} syntax's way to name a "
                f"field (this task's syntax is {syntax!r}: {'{{field}}' if syntax == 'jinja' else '{field}'})"
                if other else "")
        raise SourceError(f"{where} = {text[:80]!r}: reads no field of the record, so every example would get the "
                          f"same text; expected a template naming fields{hint}")
    if syntax == "jinja":
        return _JINJA.from_string(text).render
    return lambda fields: text.format_map(fields)


def _templates(entries, syntax: str, where: str, prefix: str) -> list[Template]:
    if not isinstance(entries, (list, tuple)):
        raise SourceError(f"{where}: is {a_type(entries)}, expected a list of (prompt, completion) templates")
    templates = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if isinstance(entry, Mapping):
            entry = dict(entry)
            unknown = sorted(set(entry) - {"name", "prompt", "completion"})
            if unknown or "prompt" not in entry or "completion" not in entry:
                raise SourceError(f"{at}: expected keys prompt, completion and optionally name; got {sorted(entry)}")
            name, prompt, completion = entry.get("name", f"{prefix}{i}"), entry["prompt"], entry["completion"]
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            name, (prompt, completion) = f"{prefix}{i}", entry
        else:
            raise SourceError(f"{at}: expected a (prompt, completion) pair or a dict with prompt and completion")
        templates.append(Template(name, _compile(prompt, syntax, f"{at}.prompt"),
                                  _compile(completion, syntax, f"{at}.completion")))
    return templates


def _share(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise SourceError(f"{where} = {value!r}: expected a number in [0, 1]")
    return float(value)


class TemplateSet:
    """The templates of one task and the rules that pick and fill them."""

    def __init__(self, spec: Mapping, where: str):
        unknown = sorted(set(spec) - set(TEMPLATE_FIELDS))
        if unknown:
            raise SourceError(f"{where}: unknown keys {unknown}; expected some of {sorted(TEMPLATE_FIELDS)}")
        spec = {**TEMPLATE_FIELDS, **spec}
        if spec["syntax"] not in SYNTAXES:
            raise SourceError(f"{where}.syntax = {spec['syntax']!r}: expected one of {SYNTAXES}")
        if not spec["templates"]:
            raise SourceError(f"{where}.templates: expected at least one (prompt, completion) template")
        templates = _templates(spec["templates"], spec["syntax"], f"{where}.templates", "t")
        held_out = spec["held_out"]
        if isinstance(held_out, bool) or not isinstance(held_out, int) or not 0 <= held_out < len(templates):
            raise SourceError(f"{where}.held_out = {held_out!r}: expected an integer from 0 to "
                              f"{len(templates) - 1} (at least one template must be trained on)")
        self.trained = templates[:len(templates) - held_out]
        self.held_out = templates[len(templates) - held_out:]
        self.inverted = _templates(spec["inverted"], spec["syntax"], f"{where}.inverted", "inverted")
        self.invert_share = _share(spec["invert_share"], f"{where}.invert_share")
        if self.invert_share and not self.inverted:
            raise SourceError(f"{where}.invert_share = {self.invert_share}: needs templates in {where}.inverted")
        self.few_shot_share = _share(spec["few_shot_share"], f"{where}.few_shot_share")
        shots = spec["shots"]
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise SourceError(f"{where}.shots = {shots!r}: expected a positive integer")
        self.shots, self.separator = shots, spec["separator"]
        self.options, self.options_field = spec["options"], spec["options_field"]
        if self.options is not None and self.options_field is not None:
            raise SourceError(f"{where}: set options or options_field, not both")
        if self.options is not None and (not isinstance(self.options, (list, tuple)) or not self.options):
            raise SourceError(f"{where}.options = {self.options!r}: expected a non-empty list of answers")
        # Template ids for examples: trained, then held-out, then inverted templates.
        self.ids = {t.name: i for i, t in enumerate(self.trained + self.held_out + self.inverted)}

    def pick(self, key: Sequence[int], held_out: bool) -> Template:
        """Evaluation's choice: a trained (or held-out) template, never an inverted one."""
        pool = self.held_out if held_out else self.trained
        return pool[np.random.default_rng(list(key)).integers(len(pool))]

    def choose(self, key: Sequence[int], held_out: bool, exemplar_pool: int,
               exclude: int = -1) -> tuple[Template, list[int]]:
        """The template and the exemplar positions (into the train split, never
        `exclude`, the example itself) for the example identified by `key`, from a
        generator seeded by the key alone."""
        rng = np.random.default_rng(list(key))
        if held_out:
            return self.held_out[rng.integers(len(self.held_out))], []
        if rng.random() < self.invert_share:
            return self.inverted[rng.integers(len(self.inverted))], []
        template = self.trained[rng.integers(len(self.trained))]
        if exemplar_pool < 2 or rng.random() >= self.few_shot_share:
            return template, []
        shots = int(rng.integers(1, min(self.shots, exemplar_pool - 1) + 1))
        candidates = [int(p) for p in rng.choice(exemplar_pool, size=shots + 1, replace=False) if p != exclude]
        return template, candidates[:shots]

    def fields(self, record: Mapping) -> dict:
        """The record's fields plus `options` and the rendered `options_` block."""
        fields = {k: v for k, v in record.items() if k != "_where"}
        options = self.options
        if self.options_field is not None:
            options = record.get(self.options_field)
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise SourceError(f"{record.get('_where', '?')}: field {self.options_field!r} is "
                                  f"{type(options).__name__}, expected a list of answer strings")
        if options is not None:
            fields["options"], fields["options_"] = list(options), options_block(options)
        return fields

    def render(self, template: Template, record: Mapping, exemplars: Sequence[Mapping] = ()) -> list[dict]:
        """One user turn (exemplars, then the prompt) and the completion as the answer."""
        shots = [(_fill(template.prompt, e, self, template), _fill(template.completion, e, self, template))
                 for e in exemplars]
        prompt = few_shot_prompt(shots, _fill(template.prompt, record, self, template), self.separator)
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _fill(template.completion, record, self, template)}]


def _fill(part: Callable[[Mapping], str], record: Mapping, templates: TemplateSet, template: Template) -> str:
    try:
        return part(templates.fields(record))
    except (jinja2.UndefinedError, KeyError, IndexError, AttributeError) as e:
        fields = sorted(k for k in record if k != "_where")
        raise SourceError(f"{record.get('_where', '?')}: template {template.name!r} reads a field the record "
                          f"lacks ({e}); the record has {fields}") from None
    except SourceError:
        raise
    except Exception as e:  # the template's own code failed on this record's values (a bad record, skippable)
        raise SourceError(f"{record.get('_where', '?')}: template {template.name!r} failed on this record: "
                          f"{type(e).__name__}: {e}") from None


def example_key(seed: int, task: str, index: int, epoch: int) -> tuple[int, ...]:
    return seed, zlib.crc32(task.encode()), index, epoch
