"""A stand-in for `gcloud compute tpus tpu-vm {ssh,scp} TPU ... --worker=all`, for
tests/test_launch.py: each directory in $FAKE_TPU_WORKERS (colon-separated) is one
worker's home. ssh runs the command with bash in every worker's home, where `hostname`
answers the directory's name. scp copies into every worker's home as scp does: a
directory needs --recurse, and the target folder must exist. Absolute remote paths lie
under the worker's home too, their folder created as needed (the stand-in ssh cannot
redirect a `mkdir -p /abs/path`). Exits with the first failing worker's code.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def ssh(home: Path, args: list[str]) -> int:
    bin_dir = home / ".stand-in-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "hostname").write_text(f"#!/bin/sh\necho {home.name}\n")
    (bin_dir / "hostname").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.call(["bash", "-c", args[args.index("--command") + 1]], cwd=home, env=env)


def scp(home: Path, args: list[str]) -> int:
    local, remote = [a for a in args if not a.startswith("--")][:2]  # LOCAL TPU:REMOTE --zone ...
    source, remote = Path(local), remote.split(":", 1)[1]
    target = home / remote.lstrip("/")
    folder = target if remote.endswith("/") else target.parent
    if remote.startswith("/"):
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        print(f"scp: {folder}: No such file or directory", file=sys.stderr)
        return 1
    if target.is_dir():
        target = target / source.name
    if source.is_dir():
        if "--recurse" not in args:
            print(f"scp: {source}: not a regular file", file=sys.stderr)
            return 1
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy(source, target)
    return 0


def main(argv: list[str]) -> int:
    command = {"ssh": ssh, "scp": scp}.get(argv[3]) if argv[:3] == ["compute", "tpus", "tpu-vm"] else None
    if command is None or "--worker=all" not in argv:
        print(f"gcloud stand-in: unexpected {argv}", file=sys.stderr)
        return 1
    codes = [command(Path(home), argv[4:]) for home in os.environ["FAKE_TPU_WORKERS"].split(":")]
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
