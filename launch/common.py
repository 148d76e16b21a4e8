"""What every launcher shares: the job (config, workdir, overrides), checked locally
before anything starts, and the `jit-tune train` command each host runs."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def check_config(config: str, overrides: list[str]):
    """Load and validate the config here, so a typo fails now and not on 64 hosts."""
    from jit_tune.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)


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
