"""What every launcher shares: the job (config, workdir, overrides), checked locally
before anything starts, and the `jit-tune train` command each host runs."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_PREEMPTED = 75  # jit_tune/train/preemption.py: saved a checkpoint on SIGTERM; rerun to resume


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="config file (path.py[:arg]), the same one every host reads")
    p.add_argument("--workdir", required=True, help="run directory on storage every host shares")
    p.add_argument("--dry-run", action="store_true", help="print exactly what would run, run nothing")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Launcher flags, and the --config.x=y overrides passed on to every host."""
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, rest


def fail(message: str) -> NoReturn:
    """Stop before anything runs, with exit code 2 (a usage error), as argparse does."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_config(config: str, overrides: list[str]):
    """Load and validate the config here, so a typo fails now and not on 64 hosts."""
    from jit_tune.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e))


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
