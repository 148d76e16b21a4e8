"""Launchers (launch/*.py): the exact commands, manifests and scripts they would run, and
a real local multi-process run; cluster detection for jax.distributed."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jit_tune.distributed import DistributedError, cluster, explicit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import gke  # noqa: E402
import local  # noqa: E402
import slurm  # noqa: E402
import tpu_vm  # noqa: E402

JOB = ["--config", "configs/tiny.py", "--workdir", "/shared/runs/x", "--config.optimizer.lr=1e-4"]
TRAIN = "jit-tune train --config configs/tiny.py --workdir /shared/runs/x --config.optimizer.lr=1e-4"


def _dry(module, capsys, *args) -> str:
    assert module.main([*args, *JOB, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_tpu_vm_queued_resource_bootstrap_and_train_on_every_worker(capsys):
    out = _dry(tpu_vm, capsys, "--tpu", "pod", "--zone", "us-east5-a", "--project", "p", "--queued-resource", "qr",
               "--accelerator", "v5p-256", "--runtime-version", "v2-alpha-tpuv5", "--bootstrap",
               "https://example.com/jit_tune.git").splitlines()
    where = "--zone us-east5-a --project p"
    assert out[0] == ("gcloud compute tpus queued-resources create qr --node-id pod --accelerator-type v5p-256 "
                      f"--runtime-version v2-alpha-tpuv5 {where}")
    assert "queued-resources describe qr" in out[1] and "ACTIVE" in out[1]
    ssh = f"gcloud compute tpus tpu-vm ssh pod {where} --worker=all --command "
    assert out[2].startswith(ssh) and "bash tools/setup_env.sh tpu" in out[2]
    assert out[3] == ssh + shlex.quote(f"cd jit_tune && .venv/bin/{TRAIN}")


def test_gke_tpu_jobset_covers_every_host_of_every_slice(capsys):
    out = _dry(gke, capsys, "--image", "img:1", "--topology", "v5p:4x4x8", "--slices", "2")
    manifest = yaml.safe_load(out.split("\nkubectl")[0])
    job = manifest["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]["template"]["spec"]
    assert manifest["kind"] == "JobSet" and job["replicas"] == 2
    assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == 32  # 128 chips / 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x8"}
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}
    assert shlex.join(pod["containers"][0]["command"]) == TRAIN
    assert out.rstrip().endswith("kubectl apply -f -")


def test_gke_gpu_jobset_points_every_pod_at_pod_zero(capsys):
    out = _dry(gke, capsys, "--image", "img:1", "--gpu", "nvidia-h100-80gb", "--nodes", "4", "--name", "run")
    pod = yaml.safe_load(out.split("\nkubectl")[0])["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}
    assert env["JIT_TUNE_COORDINATOR"] == "run-workers-0-0.run:8476" and env["JIT_TUNE_NUM_PROCESSES"] == "4"
    assert "job-completion-index" in env["JIT_TUNE_PROCESS_ID"]["fieldRef"]["fieldPath"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}


def test_gke_xpk_command(capsys):
    out = _dry(gke, capsys, "--xpk", "--cluster", "c", "--image", "img:1", "--topology", "v5p:4x4x4", "--name", "w")
    assert out.strip() == ("xpk workload create --cluster c --workload w --tpu-type v5p-128 --num-slices 1 "
                           f"--docker-image img:1 --max-restarts 100 --command {shlex.quote(TRAIN)}")


def test_slurm_script_runs_one_task_per_node_and_requeues_on_preemption(capsys):
    out = _dry(slurm, capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--remote-dir", "/code")
    assert out.startswith("# /shared/runs/x/launch/job.sbatch\n#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120",
                 f"srun --kill-on-bad-exit=1 /code/.venv/bin/{TRAIN} &",
                 "if [ $code -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; fi"):
        assert line in out.splitlines(), line
    assert out.rstrip().endswith("sbatch /shared/runs/x/launch/job.sbatch")


def test_local_dry_run_gives_each_process_its_coordinates(capsys):
    out = _dry(local, capsys, "--processes", "2", "--port", "9999", "--devices-per-process", "2",
               "--program", "jit-tune").splitlines()
    assert out == [f"JIT_TUNE_COORDINATOR=127.0.0.1:9999 JIT_TUNE_NUM_PROCESSES=2 JIT_TUNE_PROCESS_ID={i} "
                   f"JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 {TRAIN}" for i in (0, 1)]


def test_a_config_error_stops_the_launcher_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        slurm.main(["--nodes", "2", "--config", "configs/tiny.py", "--workdir", "/x", "--config.optimizer.lrr=1",
                    "--dry-run"])
    assert exit_.value.code == 2
    assert "did you mean config.optimizer.lr?" in capsys.readouterr().err


def _launch_locally(workdir, *overrides: str) -> subprocess.Popen:
    """launch/local.py running configs/tiny.py:smoke as 2 processes of 2 CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "2", "--config",
         "configs/tiny.py:smoke", "--workdir", str(workdir), *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_local_launcher_trains_as_two_processes(tmp_path):
    workdir = tmp_path / "run"
    launcher = _launch_locally(workdir, "--config.eval.examples_per_task=1")
    stdout, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr[-3000:]
    assert "Per-task validation at step 6" in stdout
    assert (workdir / "checkpoints" / "6" / "data" / "stream_1.json").is_file()  # one stream per process


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "h0"}, "tpu"),
    ({"HOME": "/root"}, None),
])
def test_cluster_detection(environ, expected):
    assert cluster(environ, chips=0) == expected


def test_a_tpu_vm_is_recognized_by_its_chips():
    assert cluster({}, chips=4) == "tpu"
    assert cluster({}) is None  # this machine has no TPU chips


def test_explicit_coordinates_from_flags_or_environment():
    env = {"JIT_TUNE_COORDINATOR": "h0:1234", "JIT_TUNE_NUM_PROCESSES": "4", "JIT_TUNE_PROCESS_ID": "3"}
    assert explicit(None, None, None, env) == ("h0:1234", 4, 3)
    assert explicit("h1:1", 2, 0, env) == ("h1:1", 2, 0)
    assert explicit(None, None, None, {}) is None
    with pytest.raises(DistributedError, match="also give the number of processes"):
        explicit("h0:1", None, None, {})
    with pytest.raises(DistributedError, match="process id 4: expected 0 to 3"):
        explicit("h0:1", 4, 4, {})


def test_cli_reports_incomplete_coordinates(capsys):
    from jit_tune.cli import main

    assert main(["train", "--config", "configs/tiny.py", "--workdir", "/tmp/x", "--coordinator", "h:1"]) == 2
    assert "also give the number of processes" in capsys.readouterr().err


def test_sigterm_to_a_two_process_run_saves_one_step_everywhere_and_exits_75(tmp_path):
    import json
    import signal
    import time

    from jit_tune.train.preemption import AGREE_EVERY, EXIT_PREEMPTED

    workdir = tmp_path / "run"
    launcher = _launch_locally(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                               "--config.train.checkpoint_every=1000")
    metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # passed on to both processes
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == EXIT_PREEMPTED, err[-3000:]
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and int(steps[0].name) % AGREE_EVERY == 0  # the step both agreed on
    assert {p.name for p in (steps[0] / "data").iterdir()} >= {"stream_0.json", "stream_1.json"}
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert max(logged) == int(steps[0].name)
