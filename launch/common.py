"""What every launcher shares: the jobs (config, workdir, overrides), one or a sweep's
pending runs, checked locally before anything starts, and the `jit-tune train` command
each host runs."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import NamedTuple, NoReturn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_PREEMPTED = 75  # jit_tune/train/preemption.py: saved a checkpoint on SIGTERM; rerun to resume


def parser(description: str, sweeps: bool = False) -> argparse.ArgumentParser:
    """The launcher's own flags; with `sweeps`, --sweep SWEEP_DIR may stand for --config/--workdir."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=not sweeps, help="config file (path.py[:arg]), the same one every host reads")
    p.add_argument("--workdir", required=not sweeps, help="run directory on storage every host shares")
    if sweeps:
        p.add_argument("--sweep", metavar="SWEEP_DIR",
                       help="run the pending runs of this sweep (its manifest.json) instead of one --config/--workdir")
        p.add_argument("--kind", choices=("proxy", "confirm", "all"), help="with --sweep: which runs (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print exactly what would run, run nothing")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Launcher flags, and the --config.x=y overrides passed on to every host."""
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "sweep"):
        if args.sweep and (args.config or args.workdir or rest):
            p.error("--sweep runs the runs its manifest plans, each with its own config, workdir and overrides: "
                    "give either --sweep SWEEP_DIR or --config and --workdir (and --config.x=y overrides)")
        if not args.sweep and not (args.config and args.workdir):
            p.error("give --config and --workdir (one run) or --sweep SWEEP_DIR (a sweep's pending runs)")
        if args.kind and not args.sweep:
            p.error("--kind needs --sweep")
    return args, rest


def warn(message: str) -> None:
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    """Stop before anything runs, with exit code 2 (a usage error), as argparse does."""
    warn(f"error: {message}")
    sys.exit(2)


def check_config(config: str, overrides: list[str], what: str = ""):
    """Load and validate the config here, so a typo fails now and not on 64 hosts."""
    from jit_tune.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        fail(f"{what}{e}")


class Job(NamedTuple):
    """One run to launch, its config loaded and checked here."""
    run: str | None  # the sweep's run id; None for the one --config/--workdir job
    args: argparse.Namespace  # the launcher's flags, with this run's config and workdir
    overrides: list[str]
    config: object  # the loaded ConfigDict


def run_job(argv: list[str]) -> tuple[str, str, list[str]]:
    """A sweep run's `jit-tune` argv (`train --config SPEC --workdir DIR --config.x=y ...`)
    as (config spec, workdir, overrides)."""
    words, flags, overrides = iter(argv[1:]), {}, []
    for word in words:
        if word in ("--config", "--workdir"):
            flags[word] = next(words, None)
        elif word.startswith("--config."):
            overrides.append(word)
        else:
            raise ValueError(f"unexpected {word!r} in {shell(argv)}")
    if argv[:1] != ["train"] or not (flags.get("--config") and flags.get("--workdir")):
        raise ValueError(f"expected `train --config SPEC --workdir DIR [--config.x=y ...]`, not {shell(argv)}")
    return flags["--config"], flags["--workdir"], overrides


def jobs(args: argparse.Namespace, overrides: list[str]) -> list[Job]:
    """What to launch: the --config/--workdir job, or with --sweep the sweep's pending runs
    (of --kind) in plan order. Every config is loaded here first, so a typo fails before
    anything is submitted."""
    if not getattr(args, "sweep", None):
        return [Job(None, args, overrides, check_config(args.config, overrides))]
    from jit_tune.sweep import plan

    try:
        manifest = plan.load_manifest(args.sweep)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    kind = None if args.kind in (None, "all") else args.kind
    found = []
    for run in plan.pending(manifest, kind):
        try:
            config, workdir, run_overrides = run_job(run["argv"])
        except ValueError as e:
            fail(f"{args.sweep}: run {run['id']}: {e}")
        job = argparse.Namespace(**{**vars(args), "config": config, "workdir": workdir})
        found.append(Job(run["id"], job, run_overrides, check_config(config, run_overrides, f"run {run['id']}: ")))
    if not found:
        print(f"# {args.sweep}: no pending {kind + ' ' if kind else ''}runs; nothing to launch", flush=True)
    return found


def local_paths(config) -> dict[str, str]:
    """The files and directories a loaded config reads, by config field: every host
    has to see them at the same path."""
    d = config.data
    paths = {f"config.data.tasks.{name}.path": spec.path for name, spec in d.tasks.items()}
    paths |= {f"config.data.task_dirs.{name}.path": spec.path for name, spec in d.task_dirs.items()}
    if config.model.init_from:
        paths["config.model.init_from"] = config.model.init_from
    # 'builtin' and 'bpe' are trained, anything else is a directory; with init_from it
    # defaults to that same directory.
    if d.tokenizer not in ("builtin", "bpe", config.model.init_from):
        paths["config.data.tokenizer"] = d.tokenizer
    return paths


def under(path: str, root: str) -> bool:
    """Whether `path` is `root` or inside it (as written: no symlinks followed)."""
    return PurePosixPath(os.path.normpath(path)).is_relative_to(os.path.normpath(root))


def train_command(args: argparse.Namespace, overrides: list[str], program: str = "jit-tune") -> list[str]:
    return [*shlex.split(program), "train", "--config", args.config, "--workdir", args.workdir, *overrides]


def shell(command: list[str]) -> str:
    return shlex.join(command)


def run(commands: list[list[str]], dry_run: bool) -> int:
    """Print each command; unless dry, run them in order, stopping at a failure."""
    for command in commands:
        print(shell(command), flush=True)
        if not dry_run:
            code = subprocess.call(command)
            if code:
                return code
    return 0


def run_queue(runs: list[tuple[str, list[str]]], dry_run: bool, stop_on_preemption: bool = False) -> int:
    """Each sweep run's command, by run id, in turn: a failed run is reported and the queue
    goes on; the end exits 1 naming the failed runs. With `stop_on_preemption`, a run
    exiting 75 ends the queue there, with 75."""
    failed = []
    for i, (run_id, command) in enumerate(runs, 1):
        print(f"# run {run_id} ({i}/{len(runs)})", flush=True)
        code = run([command], dry_run)
        if code == EXIT_PREEMPTED and stop_on_preemption:
            warn(f"run {run_id} was preempted (exit {code}): the queue stops here; rerun this command to resume "
                 "it and go on (finished runs are skipped)")
            return code
        if code:
            failed.append(f"{run_id} (exit {code})")
            warn(f"run {run_id} failed (exit {code}); going on with the next run")
    if failed:
        warn(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")
        return 1
    return 0
