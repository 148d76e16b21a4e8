"""The sweep report: a valid self-contained HTML page and a Markdown twin whose plots
exist, every run that did not finish named, and the confirmation's verdicts right."""

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from jit_tune.sweep.report import write_report

UNITS = ["qa", "nli", "summarize"]
TASKS = ["boolq", "rte", "xsum", "unseen_task"]
PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


def _table(kind: str = "dirichlet", n: int = 12) -> pd.DataFrame:
    """n proxy runs over UNITS with metric columns: the last two unfinished, the one
    before them failed; plus two confirmation runs."""
    rng = np.random.default_rng(0)
    if kind == "dirichlet":
        weights = rng.dirichlet(np.ones(len(UNITS)), size=n)
    else:  # task_count: runs on 1, 2 or 3 of the units, weighted uniformly within the set
        weights = np.zeros((n, len(UNITS)))
        for i in range(n):
            chosen = rng.choice(len(UNITS), size=1 + i % len(UNITS), replace=False)
            weights[i, chosen] = 1 / len(chosen)
    rows = []
    for i, w in enumerate(weights):
        status = "finished" if i < n - 3 else "failed" if i == n - 3 else ("started", "planned")[i - (n - 2)]
        row = {"id": f"p{i:03d}-s0", "kind": "proxy", "status": status, "seed": 0, "steps": 100,
               **{f"w/{u}": float(x) for u, x in zip(UNITS, w)}}
        for j, task in enumerate(TASKS):
            score = 0.3 + 0.4 * w[j % len(UNITS)] + 0.02 * rng.standard_normal()
            row[f"task/{task}/held_in/score"] = score
            row[f"task/{task}/held_in/exact_match"] = score * 0.9
        row["cluster/qa/held_in/score"] = row["task/boolq/held_in/score"]
        row["overall/unseen/held_in/score"] = row["task/unseen_task/held_in/score"] + 0.05 * (w > 0).sum()
        row["target"] = 0.5 + 0.3 * w[0] - 0.1 * w[2] + 0.01 * rng.standard_normal()
        if status != "finished":
            for key in list(row):
                if "/held_in/" in key or key == "target":
                    row[key] = float("nan")
        rows.append(row)
    for seed in (0, 1):
        rows.append({"id": f"c-proposed-s{seed}", "kind": "confirm", "status": "finished", "seed": seed,
                     "steps": 200, "w/qa": 0.6, "w/nli": 0.3, "w/summarize": 0.1, "target": 0.7})
    return pd.DataFrame(rows)


def _fits(table: pd.DataFrame) -> dict:
    finished = table[(table["kind"] == "proxy") & (table["status"] == "finished")]
    actual = finished["target"].to_numpy()
    noise = np.random.default_rng(1).standard_normal(len(actual))
    return {"log_linear": {"spearman": 0.8, "rmse": 0.02, "regret": 0.01, "n": len(actual), "folds": len(actual),
                           "oof": list(actual + 0.01 * noise)},
            "linear": {"spearman": 0.5, "rmse": 0.05, "regret": 0.04, "n": len(actual), "folds": len(actual),
                       "oof": list(actual + 0.05 * noise)}}


PROPOSAL = {"weights": {"qa": 0.6, "nli": 0.3, "summarize": 0.1}, "predicted": 0.68, "std": 0.02, "kl": 0.12}
PRIOR = {u: 1 / 3 for u in UNITS}


def _confirm(proposed: float, uniform: float, examples: float) -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        rows.append({"label": "proposed", "seed": seed, "target": proposed + 0.01 * seed, "predicted": 0.68})
        rows.append({"label": "uniform", "seed": seed, "target": uniform + 0.01 * seed, "predicted": float("nan")})
        rows.append({"label": "examples", "seed": seed, "target": examples + 0.01 * seed, "predicted": float("nan")})
    return pd.DataFrame(rows)


class _Checker(HTMLParser):
    """Collects <img> sources and checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def _check_html(path) -> tuple[str, list[str]]:
    text = path.read_text()
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    for src in checker.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)
    return text, checker.images


def _check_markdown(path) -> tuple[str, list[str]]:
    text = path.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for image in images:
        assert image.endswith(".png")
        assert (path.parent / image).read_bytes().startswith(PNG)
    return text, images


def _report(tmp_path, table=None, confirm=None, maximize=True, **kwargs):
    table = _table() if table is None else table
    arguments = {"directory": tmp_path, "table": table, "units": UNITS, "target": "overall/all/held_in/score",
                 "maximize": maximize, "fits": _fits(table), "chosen": "log_linear", "proposal": PROPOSAL,
                 "prior": PRIOR, "confirm": confirm}
    arguments.update(kwargs)
    return write_report(**arguments)


def test_full_report(tmp_path):
    html_path, md_path = _report(tmp_path, confirm=_confirm(0.70, 0.60, 0.65))
    assert (html_path, md_path) == (tmp_path / "report.html", tmp_path / "report.md")
    html, html_images = _check_html(html_path)
    markdown, md_images = _check_markdown(md_path)
    names = {m.rsplit("/", 1)[-1] for m in md_images}
    assert names == {"target_vs_weights.png", "interactions.png", "trust.png", "proposal.png", "confirmation.png"}
    assert len(html_images) == len(md_images)
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "report_files").glob(".*tmp*"))
    for text in (html, markdown):
        summary = re.split(r"<h2>Target against|## Target against", text)[0]
        assert "p009-s0" in summary  # failed
        assert "p010-s0" in summary and "p011-s0" in summary  # started, planned
        assert re.search(r"Failed proxy runs \(1\)", summary)
        assert re.search(r"Unfinished proxy runs \(2\)", summary)
        assert "higher is better" in summary
        assert "chosen" in text
        assert "0.68" in text  # the predicted target in the proposal's caption
        assert "Skipped: every proxy run trains on the same number of units (3)" in text
    assert "**beat** `uniform`" in markdown and "**beat** `examples`" in markdown
    assert "did not beat" not in markdown
    assert "<strong>beat</strong> <code>uniform</code>" in html


def test_confirmation_losing_and_minimizing(tmp_path):
    # Maximizing: the proposal loses to `examples` and beats `uniform`.
    _, md_path = _report(tmp_path / "a", confirm=_confirm(0.62, 0.60, 0.65))
    markdown = md_path.read_text()
    assert "**beat** `uniform`" in markdown
    assert "**did not beat** `examples`" in markdown
    # Minimizing the same numbers flips both verdicts.
    _, md_path = _report(tmp_path / "b", confirm=_confirm(0.62, 0.60, 0.65), maximize=False)
    markdown = md_path.read_text()
    assert "**did not beat** `uniform`" in markdown
    assert "**beat** `examples`" in markdown
    assert "lower is better" in markdown
    # A tie does not beat.
    _, md_path = _report(tmp_path / "c", confirm=_confirm(0.60, 0.60, 0.60))
    assert md_path.read_text().count("**did not beat**") == 2


def test_task_count_ablation(tmp_path):
    table = _table("task_count")
    html_path, md_path = _report(tmp_path, table=table)
    _check_html(html_path)
    markdown, images = _check_markdown(md_path)
    assert "report_files/task_count.png" in images
    assert "overall/unseen/held_in/score" in markdown.split("## Task-count ablation")[1]
    # The ablation's table has one row per count of units trained on.
    for count in (1, 2, 3):
        assert re.search(rf"^\| {count} \| \d+ \|", markdown, re.MULTILINE)


def test_missing_inputs(tmp_path):
    # A second report into the same directory drops the plots the first one had.
    _report(tmp_path, confirm=_confirm(0.7, 0.6, 0.65))
    html_path, md_path = _report(tmp_path, fits={}, chosen=None, proposal=None, confirm=None)
    html, _ = _check_html(html_path)
    markdown, images = _check_markdown(md_path)
    for text in (html, markdown):
        assert "Skipped: no surrogate was fitted" in text
        assert "Skipped: no surrogate was fitted." in text  # the proposal's section
        assert "Skipped: no confirmation runs were given" in text
    assert {p.name for p in (tmp_path / "report_files").glob("*.png")} == {i.rsplit("/", 1)[-1] for i in images}
    assert "trust.png" not in markdown and "proposal.png" not in markdown


def test_no_finished_runs(tmp_path):
    table = _table()
    table["status"] = np.where(table["kind"] == "proxy", "planned", table["status"])
    for column in table.columns:
        if "/held_in/" in column or column == "target":
            table.loc[table["kind"] == "proxy", column] = np.nan
    html_path, md_path = _report(tmp_path, table=table, fits={}, chosen=None, proposal=None)
    _check_html(html_path)
    markdown, images = _check_markdown(md_path)
    assert images == []
    assert "Unfinished proxy runs (12)" in markdown
    assert "no best run" in markdown
    assert "Skipped: 0 finished proxy run(s) with a target" in markdown


def test_oof_mismatch_is_reported(tmp_path):
    table = _table()
    fits = _fits(table)
    fits["linear"]["oof"] = fits["linear"]["oof"][:3]
    _, md_path = _report(tmp_path, fits=fits)
    markdown = md_path.read_text()
    assert "`linear`: 3 out-of-fold predictions for 9 finished proxy runs; not plotted" in markdown
    assert "report_files/trust.png" in markdown


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
