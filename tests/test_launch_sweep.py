"""Launchers with --sweep: a sweep's pending runs (its manifest.json, written here by
hand) as a SLURM job array, one GKE JobSet (or xpk workload) each, or a queue on a TPU
VM slice, run against stand-ins for srun, scontrol, sbatch, kubectl and gcloud."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import common  # noqa: E402
import gke  # noqa: E402
import slurm  # noqa: E402
import tpu_vm  # noqa: E402

SLURM = ["--nodes", "2", "--remote-dir", "/code"]
TPU = ["--tpu", "pod", "--zone", "z"]


def _sweep(tmp_path, kinds=("proxy", "proxy", "proxy"), finished=(), bad=None) -> tuple[Path, list[dict]]:
    """A sweep dir whose manifest.json plans one run per kind (as jit_tune/sweep/plan.py
    writes it); `finished` runs hold their final evaluation; run `bad` has a config typo."""
    directory = tmp_path / "sweep"
    runs = []
    for i, kind in enumerate(kinds):
        run_id = f"{kind[0]}{i:03d}-s0"
        workdir = directory / "runs" / run_id
        argv = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.seed=0",
                "--config.logging.group=sweep", f"--config.data.mixture.sort={0.1 * (i + 1):.1f}"]
        if run_id == bad:
            argv.append("--config.optimizer.lrr=1")
        runs.append({"id": run_id, "kind": kind, "point": i, "seed": 0, "mixture": {"sort": 0.1 * (i + 1)},
                     "workdir": str(workdir), "argv": argv})
        if run_id in finished:
            (workdir / "eval").mkdir(parents=True)
            (workdir / "config.json").write_text(json.dumps({"train": {"steps": 6}}))
            (workdir / "eval" / "results.json").write_text(json.dumps({"step": 6}))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({"name": "sweep", "base": "configs/tiny.py:smoke",
                                                         "runs": runs}))
    return directory, runs


def _stand_ins(tmp_path, **scripts: str) -> dict[str, str]:
    """An environment whose PATH starts with stand-ins for cluster tools: bash scripts, by name."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _launch(launcher: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"launch/{launcher}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _refused(module, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        module.main(list(args))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_sweep_and_a_single_job_exclude_each_other(tmp_path, capsys):
    directory, _ = _sweep(tmp_path)
    job = ["--config", "configs/tiny.py", "--workdir", "/x"]
    assert "give either --sweep SWEEP_DIR or --config and --workdir" in _refused(
        slurm, capsys, *SLURM, "--sweep", str(directory), *job)
    assert "give either --sweep" in _refused(gke, capsys, "--image", "i", "--gpu", "g", "--sweep", str(directory),
                                             "--config.seed=1")
    assert "give --config and --workdir (one run) or --sweep SWEEP_DIR" in _refused(tpu_vm, capsys, *TPU)
    assert "give --config and --workdir" in _refused(tpu_vm, capsys, *TPU, "--config", "configs/tiny.py")
    assert "--kind needs --sweep" in _refused(slurm, capsys, *SLURM, *job, "--kind", "proxy")
    assert "--max-parallel needs --sweep" in _refused(slurm, capsys, *SLURM, *job, "--max-parallel", "2")
    assert "jit-tune sweep plan" in _refused(slurm, capsys, *SLURM, "--sweep", str(tmp_path / "none"))


def test_a_run_argv_splits_into_config_workdir_and_overrides():
    assert common.run_job(["train", "--config", "c.py:v", "--workdir", "/w", "--config.seed=1"]) == (
        "c.py:v", "/w", ["--config.seed=1"])
    for argv in (["eval", "--config", "c.py", "--workdir", "/w"], ["train", "--config", "c.py"],
                 ["train", "--config", "c.py", "--workdir", "/w", "--seed", "1"]):
        with pytest.raises(ValueError):
            common.run_job(argv)


def test_a_typo_in_any_run_stops_the_launcher_before_anything_is_submitted(tmp_path, capsys):
    directory, _ = _sweep(tmp_path, bad="p001-s0")
    err = _refused(slurm, capsys, *SLURM, "--sweep", str(directory), "--dry-run")
    assert "run p001-s0: " in err and "did you mean config.optimizer.lr?" in err


def _slurm_dry(capsys, directory: Path, *args) -> tuple[str, list[str], str]:
    """The array script, the run list and the submission a --dry-run prints."""
    assert slurm.main([*SLURM, "--sweep", str(directory), *args, "--dry-run"]) == 0
    script, rest = capsys.readouterr().out.split(f"\n# {directory}/launch/slurm_runs.txt\n")
    listed, submit = rest.rstrip().split("\n\n")
    return script, listed.splitlines(), submit


def test_slurm_array_runs_the_pending_runs_of_the_kind_asked(tmp_path, capsys):
    directory, runs = _sweep(tmp_path, kinds=("proxy", "proxy", "proxy", "confirm"), finished=("p001-s0",))
    script, listed, submit = _slurm_dry(capsys, directory, "--max-parallel", "2")
    launch = directory / "launch"
    assert script.startswith(f"# {launch}/slurm_array.sbatch\n#!/bin/bash\n")
    lines = script.splitlines()
    for line in ("#SBATCH --array=0-2%2", f"#SBATCH --output={launch}/slurm-%A_%a.out", "#SBATCH --nodes=2",
                 "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120",
                 f'eval "set -- $(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {launch}/slurm_runs.txt)"',
                 'srun --kill-on-bad-exit=1 /code/.venv/bin/jit-tune "$@" &',
                 "if [ $code -eq 75 ]; then scontrol requeue ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi"):
        assert line in lines, line
    assert listed == [shlex.join(r["argv"]) for r in runs if r["id"] != "p001-s0"]  # finished: skipped
    assert submit == f"sbatch {launch}/slurm_array.sbatch"
    assert not launch.exists()  # a dry run writes nothing
    _, listed, _ = _slurm_dry(capsys, directory, "--kind", "confirm")
    assert listed == [shlex.join(runs[3]["argv"])]
    assert "#SBATCH --array=0-0%1" in _slurm_dry(capsys, directory, "--kind", "confirm")[0]


def _submit_array(tmp_path, srun: str) -> tuple[Path, list[dict], dict[str, str]]:
    """launch/slurm.py --sweep submits to a stand-in sbatch; returns the script it wrote,
    the runs and the environment with stand-in srun (which records its command) and scontrol."""
    directory, runs = _sweep(tmp_path, kinds=("proxy", "proxy"))
    env = _stand_ins(tmp_path, sbatch=f'echo "$@" > {tmp_path}/submitted',
                     srun=f'echo "$@" > {tmp_path}/srun-$SLURM_ARRAY_TASK_ID\n{srun}',
                     scontrol=f'echo "$@" >> {tmp_path}/scontrol')
    submit = _launch("slurm.py", "--nodes", "2", "--remote-dir", str(tmp_path), "--sweep", str(directory), env=env)
    assert submit.returncode == 0, submit.stderr
    return Path((tmp_path / "submitted").read_text().strip()), runs, env


def _array_task(script: Path, env: dict[str, str], index: int) -> subprocess.Popen:
    """Array task `index` of job 4242 as SLURM starts it (its own job id is 4300 + index)."""
    task = {"SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(index), "SLURM_JOB_ID": str(4300 + index)}
    return subprocess.Popen(["bash", str(script)], cwd=script.parent, env={**env, **task})


def test_slurm_array_task_runs_its_own_line_of_the_run_list(tmp_path):
    script, runs, env = _submit_array(tmp_path, srun="exit 0")
    assert (script.parent / "slurm_runs.txt").read_text() == "".join(shlex.join(r["argv"]) + "\n" for r in runs)
    for index, run in enumerate(runs):
        assert _array_task(script, env, index).wait(timeout=60) == 0
        command = (tmp_path / f"srun-{index}").read_text().split()
        assert command[:2] == ["--kill-on-bad-exit=1", f"{tmp_path}/.venv/bin/jit-tune"]
        assert command[2:] == run["argv"]  # its own --workdir among them
    assert not (tmp_path / "scontrol").exists()


def test_slurm_array_task_preempted_requeues_only_itself(tmp_path):
    # srun answers SIGTERM as jit-tune does: save, exit 75, once the batch shell has its
    # trap in place (bit 15 of SigCgt), so the signal below meets it.
    script, _, env = _submit_array(tmp_path, srun=f"""trap 'kill $sleeper; exit 75' TERM
sleep 60 & sleeper=$!
until (( 0x$(awk '/SigCgt/ {{print $2}}' /proc/$PPID/status) & 0x4000 )); do sleep 0.01; done
touch {tmp_path}/srun-started
wait""")
    task = _array_task(script, env, 1)
    deadline = time.monotonic() + 60
    while not (tmp_path / "srun-started").exists():
        assert task.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    task.send_signal(signal.SIGTERM)  # --signal=B:TERM@120, to the batch shell
    assert task.wait(timeout=60) == 75
    assert (tmp_path / "scontrol").read_text() == "requeue 4242_1\n"


def test_slurm_array_task_refuses_a_run_list_rewritten_since_submission(tmp_path):
    script, runs, env = _submit_array(tmp_path, srun="exit 0")
    (script.parent / "slurm_runs.txt").write_text(shlex.join(runs[1]["argv"]) + "\n")  # another launch's list
    assert _array_task(script, env, 0).wait(timeout=60) == 1
    assert not (tmp_path / "srun-0").exists()


GKE = ["--image", "img:1", "--topology", "v5p:4x4x8", "--pvc", "fs"]


def test_gke_sweep_is_one_jobset_per_pending_run(tmp_path, capsys):
    directory, runs = _sweep(tmp_path, finished=("p002-s0",))
    assert gke.main([*GKE, "--mount-path", str(tmp_path), "--name", "Mix_Sweep", "--sweep", str(directory),
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("kubectl apply -f -")
    documents = list(yaml.safe_load_all(out.split("\nkubectl")[0]))
    assert [d["kind"] for d in documents] == ["JobSet", "JobSet"]
    names = [d["metadata"]["name"] for d in documents]
    assert names == ["mix-sweep-p000-s0", "mix-sweep-p001-s0"]
    for document, run in zip(documents, runs):
        pod = document["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["command"] == ["jit-tune", *run["argv"]]
    # each is the JobSet of that run launched alone
    config, workdir, overrides = common.run_job(runs[1]["argv"])
    assert gke.main([*GKE, "--mount-path", str(tmp_path), "--name", names[1], "--config", config, "--workdir",
                     workdir, *overrides, "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("\nkubectl")[0]) == documents[1]


def test_gke_run_names_are_distinct_dns_labels_within_xpk_limits():
    name = gke.run_name("A very_LONG name " * 4, "P000.s1")
    assert name.endswith("-p000-s1") and len(name) <= 40 and gke.NAME.fullmatch(name)
    assert gke.run_name("jit-tune", "c003-s2") == "jit-tune-c003-s2"


def test_gke_sweep_refuses_runs_outside_the_pods_mount(tmp_path, capsys):
    directory, _ = _sweep(tmp_path)
    err = _refused(gke, capsys, *GKE, "--mount-path", "/gcs", "--sweep", str(directory), "--dry-run")
    assert f"run p000-s0: workdir {directory}/runs/p000-s0 is not under --mount-path /gcs" in err


def test_gke_applies_every_jobset_it_shows_at_once(tmp_path):
    directory, _ = _sweep(tmp_path)
    env = _stand_ins(tmp_path, kubectl=f'echo "$@" >> {tmp_path}/kubectl-args; cat > {tmp_path}/applied.yaml')
    args = [*GKE, "--mount-path", str(tmp_path), "--sweep", str(directory)]
    shown, applied = _launch("gke.py", *args, "--dry-run", env=env), _launch("gke.py", *args, env=env)
    assert shown.returncode == applied.returncode == 0, shown.stderr + applied.stderr
    assert (tmp_path / "kubectl-args").read_text() == "apply -f -\n"  # one apply
    documents = list(yaml.safe_load_all((tmp_path / "applied.yaml").read_text()))
    assert len(documents) == 3 and documents == list(yaml.safe_load_all(shown.stdout.split("\nkubectl")[0]))


def test_gke_xpk_sweep_is_one_workload_per_run(tmp_path, capsys):
    directory, runs = _sweep(tmp_path)
    assert gke.main(["--xpk", "--cluster", "c", "--image", "img:1", "--topology", "v5p:4x4x4", "--sweep",
                     str(directory), "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(commands) == 3
    for command, run in zip(commands, runs):
        assert command[:3] == ["xpk", "workload", "create"]
        assert command[command.index("--workload") + 1] == f"jit-tune-{run['id']}"
        assert shlex.split(command[command.index("--command") + 1]) == ["jit-tune", *run["argv"]]


def _tpu_workers(tmp_path) -> tuple[list[Path], dict[str, str]]:
    """Two stand-in TPU workers (tests/launch_gcloud.py) whose jit-tune shows its command
    and the config it was given (which must be on the worker), then exits with the code
    in <its workdir>/exit-code (0 if none)."""
    workers = [tmp_path / "workers" / name for name in ("w0", "w1")]
    for worker in workers:
        program = worker / "jit_tune" / ".venv" / "bin" / "jit-tune"
        program.parent.mkdir(parents=True)
        program.write_text("""#!/bin/bash
echo "jit-tune $*"
while [ $# -gt 0 ]; do
  case "$1" in --config) config=${2%%:*};; --workdir) workdir=$2;; esac; shift
done
cat "$config" || exit 1
exit $(cat "$workdir/exit-code" 2>/dev/null || echo 0)
""")
        program.chmod(0o755)
    env = _stand_ins(tmp_path, gcloud=f'exec "{sys.executable}" "{REPO}/tests/launch_gcloud.py" "$@"')
    return workers, {**env, "FAKE_TPU_WORKERS": ":".join(map(str, workers))}


def _tpu_sweep(tmp_path, exit_codes: list[int]) -> tuple[subprocess.CompletedProcess, list[dict], list[Path]]:
    directory, runs = _sweep(tmp_path)
    for run, code in zip(runs, exit_codes):
        Path(run["workdir"]).mkdir(parents=True)
        (Path(run["workdir"]) / "exit-code").write_text(str(code))
    workers, env = _tpu_workers(tmp_path)
    return _launch("tpu_vm.py", *TPU, "--sweep", str(directory), env=env), runs, workers


def _worker_logs(run: dict, workers: list[Path]) -> list[str]:
    logs = [Path(run["workdir"]) / "logs" / f"worker-{worker.name}.log" for worker in workers]
    return [log.read_text() for log in logs if log.exists()]


def test_tpu_vm_sweep_runs_every_run_in_turn_and_names_the_failed_one(tmp_path):
    launched, runs, workers = _tpu_sweep(tmp_path, [0, 2, 0])
    assert launched.returncode == 1, launched.stdout + launched.stderr
    assert "1 of 3 runs failed: p001-s0 (exit 2)" in launched.stderr
    assert "<run workdir>/logs/worker-<hostname>.log" in launched.stdout
    config = (REPO / "configs" / "tiny.py").read_text()
    for worker in workers:  # copied once, for the whole sweep
        assert (worker / "jit_tune" / "launch_configs" / "sweep" / "tiny.py").read_text() == config
    for run in runs:  # each ran on both workers, with its own command line and log
        logs = _worker_logs(run, workers)
        assert len(logs) == 2
        expected = shlex.join(["train", "--config", "launch_configs/sweep/tiny.py:smoke", *run["argv"][3:]])
        assert all(log.startswith(f"jit-tune {expected}\n") and config in log for log in logs)
    trains = [line for line in launched.stdout.splitlines() if "jit-tune train" in line]
    assert len(trains) == 3 and all(run["workdir"] in line for line, run in zip(trains, runs))  # in plan order


def test_tpu_vm_sweep_stops_at_a_preempted_run(tmp_path):
    launched, runs, workers = _tpu_sweep(tmp_path, [0, 75, 0])
    assert launched.returncode == 75, launched.stdout + launched.stderr
    assert "run p001-s0 was preempted (exit 75)" in launched.stderr
    assert [len(_worker_logs(run, workers)) for run in runs] == [2, 2, 0]  # the third never started


def test_tpu_vm_sweep_refuses_data_the_workers_cannot_see(tmp_path):
    directory, _ = _sweep(tmp_path)
    tokenizer = tmp_path / "local" / "tokenizer"
    tokenizer.mkdir(parents=True)
    manifest = json.loads((directory / "manifest.json").read_text())
    for run in manifest["runs"]:
        run["argv"].append(f"--config.data.tokenizer={tokenizer}")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    env = _stand_ins(tmp_path, gcloud=f'echo "$@" >> {tmp_path}/gcloud-calls')
    refused = _launch("tpu_vm.py", *TPU, "--sweep", str(directory), "--shared", str(directory), env=env)
    assert refused.returncode == 2 and not (tmp_path / "gcloud-calls").exists()
    assert f"cannot read config.data.tokenizer = {tokenizer}: " in refused.stderr
