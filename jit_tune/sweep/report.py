"""The sweep's report: what the proxy runs found, how far the surrogates can be trusted,
the proposed mixture, and whether it held up when trained beside the baselines.

    <directory>/report.html               one self-contained page: plots embedded as base64
                                          PNG, inline CSS, no scripts, no network resources
    <directory>/report.md                 the same content as Markdown (for a README)
    <directory>/report_files/<plot>.png   the plots the Markdown shows

Sections (each says in one line why it is skipped when its inputs are missing):

  1. Summary           runs by kind and status, every failed and unfinished run id, the
                       target and its direction, the best observed proxy run
  2. Target vs weights the target against each unit's weight, with a least-squares line
  3. Interactions      Spearman correlation of each unit's weight with each task's score
  4. Surrogate trust   the fits' out-of-fold figures, and predicted against actual
  5. Proposal          the proposed mixture against the prior, with the prediction
  6. Confirmation      the proposal against the baselines, per seed and on the mean
  7. Task count        the score against the number of units trained on (FLAN's ablation)

The content is built once as a list of sections of blocks (text, bullets, tables, plots)
and rendered twice, so the HTML and the Markdown can never disagree.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jit_tune.files import atomic_write_bytes

# The Agg canvas is used directly (not pyplot), so writing a report neither needs a
# display nor changes the backend or the global figure state of whoever calls it.

HTML, MARKDOWN, FILES = "report.html", "report.md", "report_files"
DPI = 80  # small files: the plots are small multiples, read on a screen
OVERALL_UNSEEN = "overall/unseen/held_in/score"
TASK_SCORE = re.compile(r"^task/(.+)/held_in/score$")
STATUSES = ("finished", "failed", "started", "planned")
ANNOTATE_CELLS = 150  # heatmaps up to this many cells show their values


# ----------------------------------------------------------------------------- content


@dataclass
class Text:
    text: str  # `code` and **bold** spans are rendered in both formats


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Plot:
    name: str  # the PNG's file name under report_files/, without .png
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> Section:
        self.blocks.extend(blocks)
        return self


def write_report(directory: Path, table: pd.DataFrame, units: list[str], target: str, maximize: bool,
                 fits: dict[str, dict], chosen: str | None, proposal: dict | None, prior: dict[str, float],
                 confirm: pd.DataFrame | None = None, title: str = "Mixture sweep") -> tuple[Path, Path]:
    """Write report.html and report.md (and report_files/*.png) into `directory`; returns
    (report.html, report.md). Every file is written to a temporary name and renamed into
    place, so a reader sees the old report or the new one, never half of one."""
    directory = Path(directory)
    proxy = _proxy_runs(table)
    finished = _finished(proxy)  # the rows the fits' out-of-fold predictions follow
    scored = finished[np.isfinite(finished["target"].to_numpy(float))]  # what the plots can show
    sections = [
        _summary(table, units, target, maximize),
        _target_vs_weights(scored, units),
        _interactions(scored, units),
        _trust(finished, fits, chosen),
        _proposal(proposal, prior, units, fits, chosen),
        _confirmation(confirm, maximize),
        _task_count(proxy, scored, units, maximize),
    ]
    plots = [b for s in sections for b in s.blocks if isinstance(b, Plot)]

    files = directory / FILES
    files.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        atomic_write_bytes(files / f"{plot.name}.png", plot.png)
    html_path, md_path = directory / HTML, directory / MARKDOWN
    atomic_write_bytes(md_path, _render_markdown(title, sections).encode())
    atomic_write_bytes(html_path, _render_html(title, sections).encode())
    # Plots of an earlier report that this one no longer has (a model no longer fitted)
    # would be left behind unreferenced; removed only after the new Markdown is in place.
    current = {f"{p.name}.png" for p in plots}
    for old in files.glob("*.png"):
        if old.name not in current:
            old.unlink(missing_ok=True)
    return html_path, md_path


# ------------------------------------------------------------------------------- rows


def _proxy_runs(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["kind"] == "proxy"] if "kind" in table else table


def _finished(runs: pd.DataFrame) -> pd.DataFrame:
    if "status" in runs:
        return runs[runs["status"] == "finished"]
    return runs[np.isfinite(runs["target"].to_numpy(float))]


def _weight_columns(table: pd.DataFrame, units: list[str]) -> list[str]:
    """`w/<unit>` of the units the table has (every `w/...` column if it has none of them)."""
    columns = [f"w/{u}" for u in units if f"w/{u}" in table]
    return columns or [c for c in table.columns if str(c).startswith("w/")]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho over the pairs where both are finite (NaN when undefined), computed
    from ranks so that the report needs no scipy."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    rx, ry = pd.Series(x[ok]).rank().to_numpy(), pd.Series(y[ok]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{x:.{digits}g}" if math.isfinite(x) else "n/a"


def _int(x) -> str:
    try:
        return str(int(x))
    except (TypeError, ValueError):
        return "n/a"


def _ids(rows: pd.DataFrame) -> str:
    return ", ".join(f"`{i}`" for i in rows["id"]) if "id" in rows else f"{len(rows)} runs (no id column)"


def _better(a: float, b: float, maximize: bool) -> bool:
    """Strictly better: a tie does not beat."""
    return bool(a > b) if maximize else bool(a < b)


def _direction(maximize: bool) -> str:
    return "higher is better" if maximize else "lower is better"


# ---------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" entry: the same inputs give the same bytes whatever matplotlib wrote them.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _grid(n: int, max_columns: int = 4) -> tuple[int, int]:
    columns = max(1, min(n, max_columns, max(3, math.ceil(math.sqrt(n)))))
    return math.ceil(n / columns), columns


# --------------------------------------------------------------------------- sections


def _summary(table: pd.DataFrame, units: list[str], target: str, maximize: bool) -> Section:
    section = Section("Summary")
    section.add(Text(f"Target: `{target}` ({_direction(maximize)}). Units swept ({len(units)}): "
                     + ", ".join(f"`{u}`" for u in units) + "."))
    if table.empty:
        return section.add(Text("No runs: the table is empty."))
    status = table["status"] if "status" in table else pd.Series("unknown", index=table.index)
    kind = table["kind"] if "kind" in table else pd.Series("proxy", index=table.index)
    statuses = [s for s in STATUSES if (status == s).any()] + sorted(set(status) - set(STATUSES), key=str)
    kinds = [k for k in ("proxy", "confirm") if (kind == k).any()] + sorted(set(kind) - {"proxy", "confirm"}, key=str)
    rows = [[str(k), *(str(int(((kind == k) & (status == s)).sum())) for s in statuses), str(int((kind == k).sum()))]
            for k in kinds]
    section.add(Table(["kind", *statuses, "total"], rows))

    # Runs that did not finish are named one by one: a sweep that lost runs must say so.
    notes = []
    for label, mask in (("Failed", status == "failed"),
                        ("Unfinished", ~status.isin(["finished", "failed"]))):
        for k in kinds:
            rows = table[mask & (kind == k)]
            if len(rows):
                notes.append(f"{label} {k} runs ({len(rows)}): {_ids(rows)}")
    no_target = table[(status == "finished") & ~np.isfinite(table["target"].to_numpy(float))]
    if len(no_target):
        notes.append(f"Finished runs without a target value ({len(no_target)}; left out of every plot): "
                     f"{_ids(no_target)}")
    section.add(Bullets(notes) if notes else Text("Every run finished."))

    scored = _finished(_proxy_runs(table))
    scored = scored[np.isfinite(scored["target"].to_numpy(float))]
    if scored.empty:
        return section.add(Text("No finished proxy run has a target yet, so there is no best run."))
    values = scored["target"].to_numpy(float)
    best = scored.iloc[int(np.argmax(values) if maximize else np.argmin(values))]
    weights = ", ".join(f"`{c[2:]}` {best[c]:.3g}" for c in _weight_columns(table, units) if best[c] > 0)
    seed = f", seed {best['seed']}" if "seed" in best else ""
    section.add(Text(f"Best observed proxy run: `{best.get('id', best.name)}`{seed}, target "
                     f"**{_num(best['target'])}** (of {len(scored)} finished proxy runs; range "
                     f"{_num(values.min())} to {_num(values.max())}). Its mixture: {weights}."))
    return section


def _target_vs_weights(runs: pd.DataFrame, units: list[str]) -> Section:
    section = Section("Target against each unit's weight")
    columns = _weight_columns(runs, units)
    if len(runs) < 2 or not columns:
        why = "no weight columns in the table" if not columns else f"{len(runs)} finished proxy run(s) with a target"
        return section.add(Text(f"Skipped: {why}; at least 2 runs are needed."))
    y = runs["target"].to_numpy(float)
    n_rows, n_columns = _grid(len(columns))
    figure = _figure(2.3 * n_columns, 2.0 * n_rows)
    axes = figure.subplots(n_rows, n_columns, squeeze=False, sharey=True).ravel()
    rows = []
    for ax, column in zip(axes, columns):
        x = runs[column].to_numpy(float)
        ax.scatter(x, y, s=12, alpha=0.8)
        slope = float("nan")
        if np.ptp(x) > 0:  # a unit held at one weight has no trend
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, slope * xs + intercept, color="C3", linewidth=1.2)
        ax.set_title(f"{column[2:]} (slope {_num(slope, 3)})", fontsize=8)
        ax.set_xlabel("weight", fontsize=7)
        ax.tick_params(labelsize=7)
        rows.append([f"`{column[2:]}`", _num(slope), _num(_spearman(x, y), 3)])
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    axes[0].set_ylabel("target", fontsize=7)
    section.add(Plot("target_vs_weights", _png(figure),
                     f"Target of each of the {len(runs)} finished proxy runs against each unit's weight; the line "
                     "is a least-squares fit. Weights are not independent (they sum to 1), so a slope mixes "
                     "the effect of a unit with that of the ones it displaces."),
                Table(["unit", "slope", "Spearman"], rows))
    return section


def _interactions(runs: pd.DataFrame, units: list[str]) -> Section:
    section = Section("Interactions: unit weights against task scores")
    weights = _weight_columns(runs, units)
    scores = [c for c in runs.columns if TASK_SCORE.match(str(c))]
    if not scores or not weights or len(runs) < 3:
        why = ("no per-task score columns (task/<task>/held_in/score)" if not scores else
               "no weight columns" if not weights else f"only {len(runs)} finished proxy run(s); 3 are needed")
        return section.add(Text(f"Skipped: {why}."))
    tasks = [TASK_SCORE.match(c).group(1) for c in scores]
    rho = np.array([[_spearman(runs[w].to_numpy(float), runs[s].to_numpy(float)) for s in scores] for w in weights])
    figure = _figure(min(2.5 + 0.45 * len(tasks), 30), min(1.5 + 0.35 * len(weights), 30))
    ax = figure.subplots()
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(rho), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(weights)), [w[2:] for w in weights], fontsize=7)
    ax.set_xlabel("task (held-in score)", fontsize=8)
    ax.set_ylabel("unit weight", fontsize=8)
    if rho.size <= ANNOTATE_CELLS:
        for (i, j), value in np.ndenumerate(rho):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(value) > 0.6 else "black")
    figure.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    undefined = int(np.isnan(rho).sum())
    section.add(Plot("interactions", _png(figure),
                     f"Spearman correlation, over {len(runs)} finished proxy runs, between each unit's weight "
                     "(rows) and each task's held-in score (columns). Red: runs with more of the unit score "
                     "higher on the task; blue: lower."
                     + (f" Grey ({undefined} cells): undefined, a constant weight or score." if undefined else "")))
    return section


def _trust(finished: pd.DataFrame, fits: dict[str, dict], chosen: str | None) -> Section:
    section = Section("Surrogate trust")
    if not fits:
        return section.add(Text("Skipped: no surrogate was fitted (no fits given), so nothing was proposed from one."))
    rows = [[f"`{name}`", _num(f.get("spearman"), 3), _num(f.get("rmse")), _num(f.get("regret")), _int(f.get("n")),
             _int(f.get("folds")), "**chosen**" if name == chosen else ""] for name, f in fits.items()]
    section.add(Table(["model", "Spearman", "RMSE", "regret@1", "n", "folds", "for the proposal"], rows),
                Text("Out-of-fold figures: each run is predicted by a model fitted without it. Spearman: how well "
                     "the predictions rank the runs; regret@1: how far the actual target of the run a model "
                     "ranks first falls short of the best observed one (0 is best)."))
    if chosen is not None and chosen not in fits:
        section.add(Text(f"The chosen model `{chosen}` has no fit above."))

    actual_all = finished["target"].to_numpy(float)
    actual_scored = actual_all[np.isfinite(actual_all)]
    pairs, notes = {}, []
    for name, f in fits.items():
        oof = np.asarray(f.get("oof") or [], float)
        # The predictions follow the finished proxy rows; a fit may have dropped those
        # without a target, so either length is accepted, and any other one is reported.
        if len(oof) == len(actual_all) and len(oof):
            pairs[name] = (actual_all, oof)
        elif len(oof) == len(actual_scored) and len(oof):
            pairs[name] = (actual_scored, oof)
        else:
            notes.append(f"`{name}`: {len(oof)} out-of-fold predictions for {len(actual_all)} finished proxy runs; "
                         "not plotted")
    if notes:
        section.add(Bullets(notes))
    if not pairs:
        return section.add(Text("No predicted-against-actual plot: no fit has out-of-fold predictions that match "
                                "the finished proxy runs."))
    n_rows, n_columns = _grid(len(pairs), 3)
    figure = _figure(2.6 * n_columns, 2.5 * n_rows)
    axes = figure.subplots(n_rows, n_columns, squeeze=False).ravel()
    for ax, (name, (actual, predicted)) in zip(axes, pairs.items()):
        ok = np.isfinite(actual) & np.isfinite(predicted)
        ax.scatter(actual[ok], predicted[ok], s=12, alpha=0.8, color="C3" if name == chosen else "C0")
        if ok.any():
            low = min(actual[ok].min(), predicted[ok].min())
            high = max(actual[ok].max(), predicted[ok].max())
            pad = 0.05 * (high - low or 1.0)
            ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.5", linewidth=1, linestyle="--")
        ax.set_title(f"{name}{' (chosen)' if name == chosen else ''}: "
                     f"Spearman {_num(fits[name].get('spearman'), 3)}", fontsize=8)
        ax.set_xlabel("actual target", fontsize=7)
        ax.set_ylabel("out-of-fold prediction", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    section.add(Plot("trust", _png(figure),
                     "Out-of-fold prediction against the actual target of each finished proxy run; the dashed "
                     "line is y = x. A trustworthy surrogate's points follow it, above all at the good end."))
    return section


def _proposal(proposal: dict | None, prior: dict[str, float], units: list[str], fits: dict[str, dict],
              chosen: str | None) -> Section:
    section = Section("Proposal")
    if not proposal or not proposal.get("weights"):
        why = "no surrogate was fitted" if not fits else "no proposal was given"
        return section.add(Text(f"Skipped: {why}."))
    proposed = proposal["weights"]
    names = list(units) + [u for u in list(proposed) + list(prior) if u not in units]
    names = list(dict.fromkeys(names))
    p = np.array([float(proposed.get(u, 0.0)) for u in names])
    q = np.array([float(prior.get(u, float("nan"))) for u in names])

    figure = _figure(max(4.0, 1.2 + 0.55 * len(names)), 2.8)
    ax = figure.subplots()
    x = np.arange(len(names))
    if np.isfinite(q).any():
        ax.bar(x - 0.2, np.nan_to_num(q), width=0.4, label="prior", color="0.6")
    ax.bar(x + 0.2, p, width=0.4, label="proposed", color="C3")
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                  fontsize=7)
    ax.set_ylabel("weight", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    model = f" by `{chosen}`" if chosen else ""
    caption = (f"Proposed mixture{model} against the prior. Predicted target {_num(proposal.get('predicted'))} ± "
               f"{_num(proposal.get('std'))}; KL(proposal || prior) = {_num(proposal.get('kl'), 3)}.")
    rows = [[f"`{u}`", _num(qi, 3), _num(pi, 3), _num(pi / qi, 3) if qi > 0 else "n/a"]
            for u, pi, qi in zip(names, p, q)]
    section.add(Plot("proposal", _png(figure), caption), Table(["unit", "prior", "proposed", "proposed / prior"], rows))
    return section


def _confirmation(confirm: pd.DataFrame | None, maximize: bool) -> Section:
    section = Section("Confirmation")
    if confirm is None or confirm.empty:
        return section.add(Text("Skipped: no confirmation runs were given (run `sweep confirm` after the proposal)."))
    # The proposal first, then the baselines in the order they come.
    labels = sorted(dict.fromkeys(confirm["label"]), key=lambda label: label != "proposed")
    seeds = sorted(confirm["seed"].unique())
    means, counts, predicted, values = {}, {}, {}, {}
    for label in labels:
        rows = confirm[confirm["label"] == label]
        per_seed = rows.groupby("seed")["target"].mean()
        values[label] = per_seed
        finite = per_seed[np.isfinite(per_seed.to_numpy(float))]
        means[label] = float(finite.mean()) if len(finite) else float("nan")
        counts[label] = len(finite)
        guess = rows["predicted"].to_numpy(float) if "predicted" in rows else np.array([])
        guess = guess[np.isfinite(guess)]
        predicted[label] = float(guess.mean()) if len(guess) else float("nan")
    header = ["label", *(f"seed {s}" for s in seeds), "mean", "predicted"]
    rows = [[f"`{label}`", *(_num(values[label].get(s)) for s in seeds),
             _num(means[label]) + ("" if counts[label] == len(seeds) else f" ({counts[label]} of {len(seeds)} seeds)"),
             _num(predicted[label])] for label in labels]
    section.add(Table(header, rows))

    statements = []
    if "proposed" not in means or not math.isfinite(means["proposed"]):
        statements.append("The proposal has no finished confirmation run, so it cannot be compared with the baselines.")
    else:
        mine = means["proposed"]
        if math.isfinite(predicted["proposed"]):
            statements.append(f"The proposal was predicted {_num(predicted['proposed'])} and got {_num(mine)} "
                              f"(actual − predicted = {_num(mine - predicted['proposed'], 3)}).")
        for label in labels:
            if label == "proposed":
                continue
            theirs = means[label]
            if not math.isfinite(theirs):
                statements.append(f"`{label}` has no finished confirmation run: no comparison.")
                continue
            shared = [s for s in seeds if np.isfinite(values["proposed"].get(s, np.nan))
                      and np.isfinite(values[label].get(s, np.nan))]
            wins = sum(_better(values["proposed"][s], values[label][s], maximize) for s in shared)
            verdict = "beat" if _better(mine, theirs, maximize) else "did not beat"
            statements.append(f"The proposal **{verdict}** `{label}` on the mean target: {_num(mine)} against "
                              f"{_num(theirs)} ({_direction(maximize)}); better on {wins} of {len(shared)} "
                              "shared seeds.")
    section.add(Bullets(statements))

    figure = _figure(max(3.0, 1.2 + 1.0 * len(labels)), 2.6)
    ax = figure.subplots()
    for i, label in enumerate(labels):
        v = values[label].to_numpy(float)
        ax.scatter(np.full(len(v), i), v, s=16, color="C3" if label == "proposed" else "C0", alpha=0.8,
                   label="seeds" if i == 0 else None)
        if math.isfinite(means[label]):
            ax.plot([i - 0.25, i + 0.25], [means[label]] * 2, color="black", linewidth=1.5,
                    label="mean" if i == 0 else None)
        if math.isfinite(predicted[label]):
            ax.scatter([i + 0.3], [predicted[label]], marker="D", facecolors="none", edgecolors="C2", s=30,
                       label="predicted" if label == "proposed" else None)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("target", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    section.add(Plot("confirmation", _png(figure),
                     f"Confirmation runs: the target of each seed (dots), their mean (bar) and the prediction "
                     f"(diamond) for the proposal and each baseline, trained with the same seeds "
                     f"({_direction(maximize)})."))
    return section


def _task_count(proxy: pd.DataFrame, scored: pd.DataFrame, units: list[str], maximize: bool) -> Section:
    section = Section("Task-count ablation")
    weights = _weight_columns(proxy, units)
    planned = (proxy[weights].fillna(0.0).to_numpy(float) > 0).sum(axis=1) if weights and len(proxy) else np.array([])
    if len(np.unique(planned)) < 2:
        why = (f"every proxy run trains on the same number of units ({int(planned[0])})" if len(planned)
               else "no proxy runs with weight columns")
        return section.add(Text(f"Skipped: {why}."))
    # FLAN's figure is about generalization, so the unseen tasks' score is shown when the
    # runs have it; otherwise the sweep's target.
    metric, label = "target", "target"
    if OVERALL_UNSEEN in scored and np.isfinite(scored[OVERALL_UNSEEN].to_numpy(float)).any():
        metric, label = OVERALL_UNSEEN, OVERALL_UNSEEN
        maximize = True
    y = scored[metric].to_numpy(float)
    counts = (scored[weights].fillna(0.0).to_numpy(float) > 0).sum(axis=1)
    ok = np.isfinite(y)
    y, counts = y[ok], counts[ok]
    if len(y) == 0:
        return section.add(Text(f"Skipped: the proxy runs train on {len(np.unique(planned))} different numbers of "
                                f"units, but none has finished with a `{label}` value yet."))
    levels = np.unique(counts)
    mean = np.array([y[counts == k].mean() for k in levels])

    figure = _figure(4.2, 2.8)
    ax = figure.subplots()
    # A small deterministic spread keeps runs with the same count and score apart.
    gap = float(np.min(np.diff(levels))) if len(levels) > 1 else 1.0
    spread = (np.arange(len(y)) % 5 - 2) * 0.04 * gap
    ax.scatter(counts + spread, y, s=12, alpha=0.6, color="C0", label="runs")
    ax.plot(levels, mean, marker="o", color="C3", label="mean")
    ax.set_xticks(levels)
    ax.set_xlabel("units trained on", fontsize=8)
    ax.set_ylabel(label, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    section.add(Plot("task_count", _png(figure),
                     f"`{label}` ({_direction(maximize)}) against the number of units each finished proxy run "
                     "trained on (nonzero weights): each run, and the mean at each count (as FLAN's ablation "
                     "of the number of task clusters)."),
                Table(["units", "runs", "mean", "min", "max"],
                      [[str(int(k)), str(int((counts == k).sum())), _num(m), _num(y[counts == k].min()),
                        _num(y[counts == k].max())] for k, m in zip(levels, mean)]))
    return section


# -------------------------------------------------------------------------- rendering


def _inline_html(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { border-bottom: 1px solid #ccc; } h2 { margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.9rem; color: #444; max-width: 48rem; }
"""


def _render_html(title: str, sections: list[Section]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<h1>{html.escape(title)}</h1>", "<nav><ul>"]
    out += [f'<li><a href="#{_slug(s.title)}">{html.escape(s.title)}</a></li>' for s in sections]
    out.append("</ul></nav>")
    for section in sections:
        out.append(f'<section id="{_slug(section.title)}">')
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Text):
                out.append(f"<p>{_inline_html(block.text)}</p>")
            elif isinstance(block, Bullets):
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in block.header)
                           + "</tr></thead><tbody>")
                out += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block.rows]
                out.append("</tbody></table>")
            elif isinstance(block, Plot):
                data = base64.b64encode(block.png).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.name)}">'
                           f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>")
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                out += [block.text, ""]
            elif isinstance(block, Bullets):
                out += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                out.append("| " + " | ".join(_markdown_cell(h) for h in block.header) + " |")
                out.append("|" + "---|" * len(block.header))
                out += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, Plot):
                out += [f"![{block.name}]({FILES}/{block.name}.png)", "", f"*{block.caption}*", ""]
    return "\n".join(out)
