"""The same sweep through Hydra's cluster launchers: submitit (local executor; the SLURM config is
checked without a cluster) and Ray (a local head on 127.0.0.1 inside a loopback-only network
namespace, every socket of its processes checked to be bound to loopback).

Needs the launchers (``pip install -e ".[test]"`` has them; ``.[slurm]``/``.[ray]`` for users);
each test skips with the reason when its plugin is not installed.
"""
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY
from numexp import sweep

SUBMITIT = "hydra_plugins.hydra_submitit_launcher"
RAY_PLUGIN = "hydra_plugins.hydra_ray_launcher"


def require(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e \".[test]\" (or .[slurm] / .[ray])")


def check_sweep(sweep_dir, seeds):
    """The sweep's runs.csv lists every run completed, each run folder is whole, BLAS was pinned."""
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert table["seed"].tolist() == seeds and (table["status"] == "completed").all(), table
    for job in range(len(seeds)):
        folder = sweep_dir / str(job)
        assert {"metrics.csv", "summary.json", "checkpoint.npz", "numexp.log"} <= {p.name for p in folder.iterdir()}
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["threads"] == 1
        assert all(b["num_threads"] == 1 for b in summary["blas"]), summary["blas"]
    # the launchers' own files (.submitit/) are not runs: collect finds the same table again
    assert sweep.collect(sweep_dir).to_csv(index=False) == (sweep_dir / "runs.csv").read_text()
    return table


def log_span(run_folder):
    """(first, last) timestamp of a run's numexp.log: when it trained."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", (run_folder / "numexp.log").read_text(), re.M)
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))
    return first, last


# --------------------------------------------------------------------------- submitit

def test_sweep_through_submitit_local_in_batches(run_cli, tmp_path):
    require(SUBMITIT)
    sweep_dir = tmp_path / "sweep"
    # submitit's local executor would start every job at once: batches of 2 cap it
    proc = run_cli("-m", *TINY, "seed=0,1,2", "threads=1", "hydra/launcher=submitit_local",
                   "hydra.sweeper.max_batch_size=2", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert output.count("Submitit 'local' sweep output dir") == 2  # two batches: jobs 0-1, then job 2
    check_sweep(sweep_dir, [0, 1, 2])
    # each job ran in a submitit job process of its own (its stdout/stderr under .submitit/)
    assert len(list(sweep_dir.glob(".submitit/*/*_0_log.out"))) == 3
    # the third run started after both runs of the first batch had ended
    spans = [log_span(sweep_dir / str(job)) for job in range(3)]
    assert spans[2][0] >= max(spans[0][1], spans[1][1]), spans


def test_submitit_slurm_config_asks_for_one_task_with_the_runs_threads(compose_cfg, tmp_path, monkeypatch):
    """No SLURM here: the composed launcher config and the sbatch script submitit would submit."""
    require(SUBMITIT, "submitit")
    # submitit's SLURM executor wants an srun on PATH; this one is found, never run
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    import submitit
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_cfg(["hydra/launcher=submitit_slurm", "threads=2", "hydra.launcher.partition=cpu",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], hydra=True)
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher_cfg["_target_"].endswith("SlurmLauncher")
    assert launcher_cfg["cpus_per_task"] == 2 and launcher_cfg["tasks_per_node"] == 1 and launcher_cfg["nodes"] == 1
    assert launcher_cfg["submitit_folder"] == f"{tmp_path / 'sweep'}/.submitit/%j"
    launcher = instantiate(cfg.hydra.launcher)
    # the parameters as the launcher hands them to submitit (hydra_submitit_launcher's launch())
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit X", "uid")
    for line in ["#SBATCH --cpus-per-task=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1",
                 "#SBATCH --mem=4GB", "#SBATCH --time=480", "#SBATCH --partition=cpu",
                 "export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2"]:
        assert line in script, script


# --------------------------------------------------------------------------- Ray
# Ray is only ever started here inside a network namespace of its own that has nothing but a
# loopback interface: even with usage stats off, Ray 2.60's dashboard asks the cloud metadata
# address (169.254.169.254) which cloud it runs on, and reports "usage stats disabled" to its
# server. In the namespace those requests fail at once (no route) and nothing leaves the machine.

LOOPBACK_ENV = {
    # without it Ray replaces 127.0.0.1 by the host's address and listens on every interface
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # a token in ~/.ray/auth_token (left by any earlier ray.init()) turns on token auth in the head
    # only; HOME is the test's own folder anyway, so nothing is read from or written to ~/.ray
    "RAY_AUTH_MODE": "disabled",
}

# In a new network namespace: bring up the loopback interface (it starts down), then exec argv[1:]
# (same process, so its pid and session stay the ones Popen gave it).
LOOPBACK_UP_AND_EXEC = """
import fcntl, os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS |= IFF_UP
s.close()
if sys.argv[1:]:
    os.execv(sys.argv[1], sys.argv[1:])
print(",".join(name for _, name in socket.if_nameindex()))
"""


def loopback_only_namespace():
    """The command prefix that runs a program in a new network namespace holding only ``lo``
    (``unshare --net``; root or CAP_SYS_ADMIN), or skip the test saying why it cannot."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("nsenter") is None:
        pytest.skip("unshare/nsenter (util-linux) not found: Ray is not started outside a loopback-only "
                    "network namespace")
    prefix = [unshare, "--net", "--", sys.executable, "-c", LOOPBACK_UP_AND_EXEC]
    probe = subprocess.run(prefix, capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or probe.stdout.strip() != "lo":
        pytest.skip(f"cannot make a loopback-only network namespace for Ray ({probe.stderr.strip()[-200:]})")
    return prefix


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_net_addresses(pid):
    """{socket inode: (protocol, local address, port)} of the TCP sockets listening and the UDP
    ones bound, in the network namespace of process ``pid``."""
    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if proto.startswith("tcp") and state != "0A":  # 0A: LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            table[inode] = (proto, ipaddress.ip_address(raw), int(hex_port, 16))
    return table


def sockets_of_sessions(sessions, netns_pid):
    """[(pid, name, protocol, address, port)] of the listening/bound sockets of every process whose
    session id is in ``sessions`` (the Ray head and the driver each get a session of their own)."""
    table, found = _proc_net_addresses(netns_pid), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) not in sessions:
                continue
            name = (entry / "comm").read_text().strip()
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except (OSError, ProcessLookupError):
            continue
        for link in links:
            match = re.fullmatch(r"socket:\[(\d+)\]", link)
            if match and int(match.group(1)) in table:
                found.append((pid, name, *table[int(match.group(1))]))
    return found


def interfaces(pid):
    """Network interfaces in the namespace of process ``pid``."""
    return sorted(line.split(":")[0].strip() for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:])


def is_loopback(address):
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def ray_temp_dir(tmp_path_factory):
    """Ray's --temp-dir: its sockets sit ~64 characters below it and AF_UNIX paths stop at 107."""
    folder = tmp_path_factory.mktemp("ray")
    if len(str(folder)) <= 40:
        return folder, False
    return Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")), True


def session_pids(sid):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def stop_session(leader, timeout=60):
    """Stop the Ray processes this test started, by their ids: SIGTERM to ``ray start --block``
    (it stops the processes it started), then SIGKILL whatever is left in its session.
    Returns the pids that were still there to be killed."""
    if leader.poll() is None:
        leader.send_signal(signal.SIGTERM)
        try:
            leader.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    left = session_pids(leader.pid)
    deadline = time.monotonic() + 10
    while session_pids(leader.pid) and time.monotonic() < deadline:
        for pid in session_pids(leader.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)
    if leader.poll() is None:
        leader.kill()
    leader.wait(10)
    return left


@pytest.mark.slow
def test_sweep_through_a_local_ray_head_on_loopback(tmp_path, tmp_path_factory):
    require("ray", RAY_PLUGIN)
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    isolated = loopback_only_namespace()
    temp_dir, own_temp = ray_temp_dir(tmp_path_factory)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HYDRA_FULL_ERROR")}
    env.update(LOOPBACK_ENV, HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    port = free_port()
    head_log = tmp_path / "ray-head.log"
    with open(head_log, "w") as log:
        head = subprocess.Popen(
            [*isolated, str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen, driver, stop_watch = [], None, threading.Event()
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in head_log.read_text():
            assert head.poll() is None, head_log.read_text()
            assert time.monotonic() < deadline, "Ray did not start in 120 s:\n" + head_log.read_text()
            time.sleep(0.2)
        assert interfaces(head.pid) == ["lo"]
        seen += sockets_of_sessions({head.pid}, head.pid)
        assert seen, "found no socket of the Ray head"

        sweep_dir = tmp_path / "sweep"  # absolute: a relative one would be resolved on the workers
        driver = subprocess.Popen(
            [shutil.which("nsenter"), f"--net=/proc/{head.pid}/ns/net", "--", sys.executable, "-m", "numexp", "-m",
             *TINY, "seed=0,1,2", "threads=1", "hydra/launcher=ray", f"hydra.sweep.dir={sweep_dir}"],
            cwd=tmp_path, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def watch():  # the workers come and go: look at the sockets all through the sweep
            while not stop_watch.is_set():
                seen.extend(sockets_of_sessions({head.pid, driver.pid}, head.pid))
                stop_watch.wait(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        output, _ = driver.communicate(timeout=300)
        stop_watch.set()
        watcher.join()
        assert driver.returncode == 0, output
        assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{port}" in output, output
        assert "_run_job pid=" in output  # the runs ran in Ray's worker processes
        check_sweep(sweep_dir, [0, 1, 2])
        assert {p.name for p in sweep_dir.iterdir()} == {"0", "1", "2", "multirun.yaml", "runs.csv"}
    finally:
        stop_watch.set()
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        stop_session(head)
        if own_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert not session_pids(head.pid), "Ray processes left after stopping"
    names = {name for _, name, *_ in seen}
    assert {"gcs_server", "raylet"} <= names, names
    outside = sorted({(name, str(addr), port) for _, name, _, addr, port in seen if not is_loopback(addr)})
    assert not outside, f"Ray listened beyond loopback: {outside}"
