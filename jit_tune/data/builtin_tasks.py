"""The built-in task suite: procedurally generated FLAN-style instruction tasks.

Every task reads the same kind of input, a short list of words, so that only the
instruction tells the model what to do with it (FLAN's point: the same word list may be
reversed, sorted, counted, deduplicated or upper-cased). Each task has several
natural-language templates; the last ones are held out of training so that zero-shot
generalization to unseen phrasings can be measured.

Examples are pure functions of (seed, task, split, index): nothing is stored or
downloaded. Train and validation never share an input list, whatever the task, because
the split of a word list is decided by a hash of the list itself.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np

# Distinct first letters keep "alphabetical order" unambiguous and easy to read.
WORDS = (
    "apple", "bird", "cake", "drum", "egg", "fish", "grape", "house", "ink", "jar",
    "kite", "lamp", "moon", "nest", "owl", "pear", "queen", "rose", "sun", "tree",
    "van", "wolf", "yak", "zebra",
)
MIN_WORDS, MAX_WORDS = 2, 4
VALIDATION_SHARE = 10  # one word list in this many belongs to validation
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    answer: Callable[[list[str]], str]
    templates: tuple[str, ...]  # trained on
    held_out_templates: tuple[str, ...]  # never trained on: zero-shot phrasing
    options: tuple[str, ...] = ()  # every possible answer, when there are few: scored by rank classification

    def template(self, template_id: int) -> str:
        return (self.templates + self.held_out_templates)[template_id]

    def is_held_out(self, template_id: int) -> bool:
        return template_id >= len(self.templates)


def _dedupe(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))


def _t(name, answer, *templates, held_out=1, options=()) -> Task:
    return Task(name, answer, tuple(templates[:-held_out]), tuple(templates[-held_out:]), tuple(options))


TASKS: tuple[Task, ...] = (
    _t("reverse", lambda w: " ".join(reversed(w)),
       "Reverse the order of these words: {words}",
       "Write the following words in reverse order.\n{words}",
       "{words}\nList these words from last to first.",
       "Words: {words}\nWhat are they in reverse order?",
       "Read this list backwards and write it out: {words}"),
    _t("sort", lambda w: " ".join(sorted(w)),
       "Sort these words alphabetically: {words}",
       "Put the following words in alphabetical order.\n{words}",
       "{words}\nArrange the words above from A to Z.",
       "Words: {words}\nWhat is their alphabetical order?",
       "Order this list as a dictionary would: {words}"),
    _t("sort_desc", lambda w: " ".join(sorted(w, reverse=True)),
       "Sort these words in reverse alphabetical order: {words}",
       "Put the following words in order from Z to A.\n{words}",
       "{words}\nArrange the words above from Z to A.",
       "Words: {words}\nWhat is their reverse alphabetical order?",
       "Order this list as a dictionary would, but backwards: {words}"),
    _t("count", lambda w: str(len(w)),
       "How many words are in this list? {words}",
       "Count the words below.\n{words}",
       "{words}\nHow many words did you just read?",
       "Words: {words}\nNumber of words:",
       "Tell me the length of this list of words: {words}",
       options=[str(n) for n in range(2, 5)]),
    _t("count_unique", lambda w: str(len(set(w))),
       "How many different words are in this list? {words}",
       "Count the distinct words below.\n{words}",
       "{words}\nHow many unique words are there?",
       "Words: {words}\nNumber of different words:",
       "Ignoring repeats, how many words does this list have? {words}",
       options=[str(n) for n in range(1, 5)]),
    _t("dedupe", lambda w: " ".join(_dedupe(w)),
       "Remove the repeated words from this list: {words}",
       "Write the following words, keeping only the first copy of each.\n{words}",
       "{words}\nDrop every word that already appeared.",
       "Words: {words}\nThe list without duplicates:",
       "Delete the duplicates and keep the order: {words}"),
    _t("uppercase", lambda w: " ".join(x.upper() for x in w),
       "Write these words in capital letters: {words}",
       "Convert the following words to upper case.\n{words}",
       "{words}\nShout the words above in all caps.",
       "Words: {words}\nIn uppercase:",
       "Rewrite this list using only capital letters: {words}"),
    _t("capitalize", lambda w: " ".join(x.capitalize() for x in w),
       "Capitalize the first letter of each word: {words}",
       "Write the following words in title case.\n{words}",
       "{words}\nStart each word above with a capital letter.",
       "Words: {words}\nIn title case:",
       "Make every word in this list begin with an upper-case letter: {words}"),
    _t("first", lambda w: w[0],
       "What is the first word in this list? {words}",
       "Write the word that comes first below.\n{words}",
       "{words}\nWhich word did the list start with?",
       "Words: {words}\nFirst word:",
       "Tell me the opening word of this list: {words}"),
    _t("last", lambda w: w[-1],
       "What is the last word in this list? {words}",
       "Write the word that comes last below.\n{words}",
       "{words}\nWhich word did the list end with?",
       "Words: {words}\nLast word:",
       "Tell me the final word of this list: {words}"),
    _t("commas", lambda w: ", ".join(w),
       "Separate these words with commas: {words}",
       "Write the following words as a comma-separated list.\n{words}",
       "{words}\nPut a comma between the words above.",
       "Words: {words}\nWith commas:",
       "Join this list using commas: {words}"),
    _t("has_duplicates", lambda w: "yes" if len(set(w)) < len(w) else "no",
       "Does any word appear twice in this list? {words}",
       "Answer yes or no: are there repeated words below?\n{words}",
       "{words}\nIs some word repeated above? Answer yes or no.",
       "Words: {words}\nContains duplicates (yes or no):",
       "Tell me yes or no, does this list repeat a word? {words}",
       options=["yes", "no"]),
)
TASKS_BY_NAME = {task.name: task for task in TASKS}


def split_of(words: Sequence[str]) -> str:
    """The split a word list belongs to, for every task alike (a stable hash, no RNG)."""
    return "validation" if zlib.crc32(" ".join(words).encode()) % VALIDATION_SHARE == 0 else "train"


def sample_words(rng: np.random.Generator) -> list[str]:
    """The shared input distribution: half of the lists repeat a word, so that
    dedupe, count_unique and has_duplicates see both cases equally often."""
    n = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]
    if rng.random() < 0.5:
        words[int(rng.integers(1, n))] = words[int(rng.integers(0, n))]
    return words


def make_example(task: Task, split: str, index: int, seed: int, held_out: bool = False,
                 template_id: int | None = None) -> dict:
    """Example `index` of `task` in `split`, a pure function of its arguments.

    `held_out` picks from the held-out templates (for evaluation); otherwise a trained
    template is drawn, unless `template_id` names one. Returns the conversation form
    every data source produces.
    """
    task_id = [t.name for t in TASKS].index(task.name)
    rng = np.random.default_rng([seed, task_id, SPLITS.index(split), int(held_out), index])
    words = sample_words(rng)
    while split_of(words) != split:
        words = sample_words(rng)
    offset = len(task.templates) if held_out else 0
    choices = task.held_out_templates if held_out else task.templates
    drawn = offset + int(rng.integers(0, len(choices)))
    template_id = drawn if template_id is None else template_id
    prompt = task.template(template_id).format(words=" ".join(words))
    return {
        "task": task.name,
        "template_id": template_id,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": task.answer(words)},
        ],
    }


def corpus(seed: int, examples_per_task: int = 200) -> list[str]:
    """Text used to train the built-in tokenizer: the trained templates and all answer
    forms. Held-out templates stay out, so that they add no token the model never saw."""
    texts = []
    for task in TASKS:
        for i in range(examples_per_task):
            ex = make_example(task, "train", i, seed)
            texts.extend(m["content"] for m in ex["messages"])
    return texts
