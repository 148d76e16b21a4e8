"""Launchers (launch/*.py): the exact commands, manifests and scripts they would run, and
a real local multi-process run; cluster detection for jax.distributed."""

import os
import shlex
import signal
import subprocess
import sys
import time
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
ON_SHARED_FS = ("--pvc", "shared-fs", "--mount-path", "/shared")  # GKE: where the pods find the workdir


def _dry(module, capsys, *args) -> str:
    assert module.main([*args, *JOB, "--dry-run"]) == 0
    return capsys.readouterr().out


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


def test_tpu_vm_queued_resource_bootstrap_and_train_on_every_worker(capsys):
    out = _dry(tpu_vm, capsys, "--tpu", "pod", "--zone", "us-east5-a", "--project", "p", "--queued-resource", "qr",
               "--accelerator", "v5p-256", "--runtime-version", "v2-alpha-tpuv5", "--bootstrap",
               "https://example.com/jit_tune.git").splitlines()
    out = [line for line in out if not line.startswith("#")]
    where = "--zone us-east5-a --project p"
    assert out[0] == ("gcloud compute tpus queued-resources create qr --node-id pod --accelerator-type v5p-256 "
                      f"--runtime-version v2-alpha-tpuv5 {where}")
    assert "queued-resources describe qr" in out[1] and "ACTIVE" in out[1]
    ssh = f"gcloud compute tpus tpu-vm ssh pod {where} --worker=all --command "
    assert out[2].startswith(ssh) and "bash tools/setup_env.sh tpu" in out[2]
    remote = shlex.split(out[-1])[-1]  # run on stand-in workers in test_tpu_vm_copies_config_and_data_...
    assert out[-1].startswith(ssh) and remote.startswith("cd jit_tune && ") and ".venv/bin/jit-tune train" in remote


def test_gke_tpu_jobset_covers_every_host_of_every_slice(capsys):
    out = _dry(gke, capsys, "--image", "img:1", "--topology", "v5p:4x4x8", "--slices", "2", *ON_SHARED_FS)
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
    out = _dry(gke, capsys, "--image", "img:1", "--gpu", "nvidia-h100-80gb", "--nodes", "4", "--name", "run",
               *ON_SHARED_FS)
    pod = yaml.safe_load(out.split("\nkubectl")[0])["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}
    assert env["JIT_TUNE_COORDINATOR"] == "run-workers-0-0.run:8476" and env["JIT_TUNE_NUM_PROCESSES"] == "4"
    assert "job-completion-index" in env["JIT_TUNE_PROCESS_ID"]["fieldRef"]["fieldPath"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}


def test_gke_xpk_command(capsys):
    out = _dry(gke, capsys, "--xpk", "--cluster", "c", "--image", "img:1", "--topology", "v5p:4x4x4", "--name", "w")
    assert out.strip() == ("xpk workload create --cluster c --workload w --tpu-type v5p-128 --num-slices 1 "
                           "--docker-image img:1 --max-restarts 100 --restart-on-exit-codes 75 "
                           f"--termination-grace-period-seconds 300 --command {shlex.quote(TRAIN)}")


def test_slurm_script_runs_one_task_per_node_and_requeues_on_preemption(capsys):
    out = _dry(slurm, capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--remote-dir", "/code")
    assert out.startswith("# /shared/runs/x/launch/job.sbatch\n#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120",
                 f"srun --kill-on-bad-exit=1 /code/.venv/bin/{TRAIN} &",
                 "if [ $code -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; fi"):
        assert line in out.splitlines(), line
    assert out.rstrip().endswith("sbatch /shared/runs/x/launch/job.sbatch")


def _slurm_job(tmp_path, srun: str) -> subprocess.Popen:
    """launch/slurm.py submits to a stand-in sbatch; the script it wrote then starts as
    SLURM starts it (bash, with SLURM_JOB_ID), over stand-in srun and scontrol."""
    env = _stand_ins(tmp_path, srun=srun, sbatch=f'echo "$@" > {tmp_path}/submitted',
                     scontrol=f'echo "$@" >> {tmp_path}/scontrol')
    submit = _launch("slurm.py", "--nodes", "2", "--remote-dir", str(tmp_path), "--config", "configs/tiny.py",
                     "--workdir", str(tmp_path / "run"), env=env)
    assert submit.returncode == 0, submit.stderr
    script = (tmp_path / "submitted").read_text().strip()
    return subprocess.Popen(["bash", script], cwd=tmp_path, env={**env, "SLURM_JOB_ID": "4242"})


def test_slurm_requeues_the_job_when_sigterm_makes_jit_tune_exit_75(tmp_path):
    # srun answers SIGTERM as jit-tune does: save, exit 75. It reports that it started
    # only once the batch shell catches SIGTERM (bit 15 of SigCgt), so the signal below
    # meets the script's trap.
    job = _slurm_job(tmp_path, srun=f"""trap 'kill $sleeper; exit 75' TERM
sleep 60 & sleeper=$!
until (( 0x$(awk '/SigCgt/ {{print $2}}' /proc/$PPID/status) & 0x4000 )); do sleep 0.01; done
touch {tmp_path}/srun-started
wait""")
    deadline = time.monotonic() + 60
    while not (tmp_path / "srun-started").exists():
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)  # SLURM's --signal=B:TERM@120, to the batch shell
    assert job.wait(timeout=60) == 75
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"


def test_slurm_does_not_requeue_a_job_that_failed_otherwise(tmp_path):
    job = _slurm_job(tmp_path, srun="exit 2")  # e.g. a config error
    assert job.wait(timeout=60) == 2
    assert not (tmp_path / "scontrol").exists()


def _manifest(capsys, *args) -> dict:
    return yaml.safe_load(_dry(gke, capsys, "--image", "img:1", *args).split("\nkubectl")[0])


def _job(manifest: dict) -> dict:
    return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]


def test_gke_pods_mount_the_gcs_bucket_and_start_in_the_image_workdir(capsys):
    manifest = _manifest(capsys, "--topology", "v5p:4x4x8", "--gcs-bucket", "bkt", "--mount-path", "/shared")
    template = _job(manifest)["template"]
    pod, container = template["spec"], template["spec"]["containers"][0]
    assert template["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    (mount,) = container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["mountPath"] == "/shared" and volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "bkt"
    assert container["workingDir"] == "/app"  # launch/Dockerfile's WORKDIR, where configs/tiny.py is


def test_gke_pods_mount_a_persistent_volume_claim(capsys):
    manifest = _manifest(capsys, "--gpu", "nvidia-h100-80gb", "--pvc", "filestore", "--mount-path", "/shared",
                         "--image-workdir", "/opt/jit_tune")
    template = _job(manifest)["template"]
    container = template["spec"]["containers"][0]
    assert template["spec"]["volumes"] == [{"name": container["volumeMounts"][0]["name"],
                                            "persistentVolumeClaim": {"claimName": "filestore"}}]
    assert container["volumeMounts"][0]["mountPath"] == "/shared" and container["workingDir"] == "/opt/jit_tune"


def _jobset_answer(manifest: dict, *pods: tuple[int, str]) -> str:
    """What Kubernetes and JobSet do when pods stop, each (exit code, pod condition or "")
    in a Job of its own: the Job's podFailurePolicy rules (first match wins; none: the
    failure counts, past backoffLimit 0) give the Job's failure reason; then the JobSet's
    failurePolicy rules are tried in order against every failed Job (none: RestartJobSet)."""
    job = _job(manifest)
    container = job["template"]["spec"]["containers"][0]["name"]
    reasons = set()
    for exit_code, condition in pods:
        reason = "BackoffLimitExceeded"
        for rule in job["podFailurePolicy"]["rules"]:
            if "onExitCodes" in rule:
                codes = rule["onExitCodes"]
                matched = (codes["containerName"] == container
                           and (exit_code in codes["values"]) == (codes["operator"] == "In"))
            else:
                matched = any(pattern["type"] == condition for pattern in rule["onPodConditions"])
            if matched:
                reason = {"FailJob": "PodFailurePolicy", "Count": reason}[rule["action"]]
                break
        reasons.add(reason)
    rules = manifest["spec"]["failurePolicy"]["rules"]
    return next((rule["action"] for rule in rules if reasons & set(rule["onJobFailureReasons"])), "RestartJobSet")


def test_gke_restarts_the_jobset_on_preemption_only(capsys):
    manifest = _manifest(capsys, "--topology", "v5p:4x4x8", "--slices", "2", *ON_SHARED_FS)
    pod = _job(manifest)["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and _job(manifest)["backoffLimit"] == 0  # what podFailurePolicy needs
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 100
    assert _jobset_answer(manifest, (75, "")) == "RestartJobSet"  # preempted: saved, resume
    assert _jobset_answer(manifest, (2, "")) == "FailJobSet"  # a config error
    assert _jobset_answer(manifest, (1, "")) == "FailJobSet"  # a crash
    assert _jobset_answer(manifest, (137, "DisruptionTarget")) == "RestartJobSet"  # evicted before it saved
    assert _jobset_answer(manifest, (1, ""), (75, "")) == "RestartJobSet"  # one slice lost its preempted peer


def test_gke_refuses_a_workdir_the_pods_do_not_mount(capsys):
    with pytest.raises(SystemExit) as exit_:
        gke.main(["--image", "i", "--topology", "v5p:4x4x8", "--gcs-bucket", "b", "--config", "configs/tiny.py",
                  "--workdir", "/elsewhere/runs/x", "--dry-run"])
    assert exit_.value.code == 2
    assert "--workdir /elsewhere/runs/x is not under --mount-path /gcs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        gke.main(["--image", "i", "--topology", "v5p:4x4x8", "--config", "configs/tiny.py", "--workdir", "/gcs/x",
                  "--dry-run"])
    assert exit_.value.code == 2
    assert "give --gcs-bucket BUCKET or --pvc CLAIM" in capsys.readouterr().err


def test_gke_applies_the_manifest_it_shows(tmp_path):
    env = _stand_ins(tmp_path, kubectl=f'echo "$@" > {tmp_path}/kubectl-args; cat > {tmp_path}/applied.yaml')
    args = ["--image", "img:1", "--topology", "v5p:4x4x8", "--gcs-bucket", "b", *JOB[:2], "--workdir", "/gcs/runs/x"]
    shown = _launch("gke.py", *args, "--dry-run", env=env)
    applied = _launch("gke.py", *args, env=env)
    assert shown.returncode == applied.returncode == 0, shown.stderr + applied.stderr
    assert (tmp_path / "kubectl-args").read_text() == "apply -f -\n"
    assert yaml.safe_load((tmp_path / "applied.yaml").read_text()) == yaml.safe_load(shown.stdout.split("\nkubectl")[0])


def _tpu_workers(tmp_path, exit_code: int) -> tuple[list[Path], dict[str, str]]:
    """Two stand-in TPU workers (tests/launch_gcloud.py) whose jit-tune shows the config
    it was given, which must be on the worker, and exits with `exit_code`."""
    workers = [tmp_path / "workers" / name for name in ("w0", "w1")]
    for worker in workers:
        program = worker / "jit_tune" / ".venv" / "bin" / "jit-tune"
        program.parent.mkdir(parents=True)
        program.write_text(f"""#!/bin/bash
echo "jit-tune $*"
while [ $# -gt 0 ]; do if [ "$1" = --config ]; then config=${{2%%:*}}; fi; shift; done
cat "$config" || exit 1
exit {exit_code}
""")
        program.chmod(0o755)
    env = _stand_ins(tmp_path, gcloud=f'exec "{sys.executable}" "{REPO}/tests/launch_gcloud.py" "$@"')
    return workers, {**env, "FAKE_TPU_WORKERS": ":".join(map(str, workers))}


def test_tpu_vm_copies_config_and_data_to_every_worker_and_keeps_each_log_and_the_exit_code(tmp_path):
    workers, env = _tpu_workers(tmp_path, exit_code=75)  # preempted
    workdir, tokenizer = tmp_path / "shared" / "runs" / "x", tmp_path / "local" / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.json").write_text("{}")
    run = _launch("tpu_vm.py", "--tpu", "pod", "--zone", "z", "--config", "configs/tiny.py:smoke", "--workdir",
                  str(workdir), "--copy-data", f"--config.data.tokenizer={tokenizer}", "--config.optimizer.lr=1e-4",
                  env=env)
    assert run.returncode == 75, run.stdout + run.stderr
    assert f"{workdir}/logs/worker-<hostname>.log" in run.stdout
    config = (REPO / "configs" / "tiny.py").read_text()
    for worker in workers:
        assert (worker / "jit_tune" / "launch_configs" / "x" / "tiny.py").read_text() == config
        assert (worker / str(tokenizer).lstrip("/") / "tokenizer.json").read_text() == "{}"  # the same path there
        log = (workdir / "logs" / f"worker-{worker.name}.log").read_text()
        assert "--config launch_configs/x/tiny.py:smoke " in log and config in log
        assert f"--config.data.tokenizer={tokenizer} --config.optimizer.lr=1e-4" in log


def test_tpu_vm_refuses_data_the_workers_cannot_see_before_anything_runs(tmp_path):
    tokenizer = tmp_path / "local" / "tokenizer"
    tokenizer.mkdir(parents=True)
    env = _stand_ins(tmp_path, gcloud=f'echo "$@" >> {tmp_path}/gcloud-calls')
    job = ["--tpu", "pod", "--zone", "z", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "shared" / "x"),
           f"--config.data.tokenizer={tokenizer}"]
    refused = _launch("tpu_vm.py", *job, env=env)
    assert refused.returncode == 2 and not (tmp_path / "gcloud-calls").exists()
    assert f"config.data.tokenizer = {tokenizer}" in refused.stderr
    assert "--shared DIR" in refused.stderr and "--copy-data" in refused.stderr
    assert _launch("tpu_vm.py", *job, "--shared", str(tmp_path / "local"), env=env).returncode == 0
    assert (tmp_path / "gcloud-calls").exists()


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


def _training_locally(workdir) -> subprocess.Popen:
    """A two-process run of many steps, returned once it has logged a step."""
    import time

    launcher = _launch_locally(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                               "--config.train.checkpoint_every=1000")
    metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    return launcher


def test_local_launcher_trains_as_two_processes(tmp_path):
    workdir = tmp_path / "run"
    launcher = _launch_locally(workdir, "--config.eval.examples_per_task=1")
    stdout, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr[-3000:]
    assert "Evaluation at step 6" in stdout
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


@pytest.mark.slow  # a second two-process run
def test_ctrl_c_on_one_process_of_two_stops_both_with_130(tmp_path):
    """A person interrupted the run: the other process, which saw no signal, must not exit
    75 (preempted), which a requeue policy would restart."""
    import signal

    from jit_tune.train.preemption import EXIT_INTERRUPTED

    workdir = tmp_path / "run"
    launcher = _training_locally(workdir)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGINT)  # one process only, as `kill -INT` would
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert err.count("interrupted (Ctrl-C): saved a checkpoint at step") == 2 and "preempted" not in err, err[-3000:]


def test_sigterm_to_a_two_process_run_saves_one_step_everywhere_and_exits_75(tmp_path):
    import json
    import signal

    from jit_tune.train.preemption import AGREE_EVERY, EXIT_PREEMPTED

    workdir = tmp_path / "run"
    launcher = _training_locally(workdir)
    launcher.send_signal(signal.SIGTERM)  # passed on to both processes
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == EXIT_PREEMPTED, err[-3000:]
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and int(steps[0].name) % AGREE_EVERY == 0  # the step both agreed on
    assert {p.name for p in (steps[0] / "data").iterdir()} >= {"stream_0.json", "stream_1.json"}
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert max(logged) == int(steps[0].name)
