"""Shared fixtures: composing the shipped config in-process, running the CLI, the shared data."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from numexp import config

REPO = Path(__file__).resolve().parents[1]
# a tiny digits run: a fraction of a second
TINY = ["model=mlp", "model.hidden=[32]", "optim=adam", "schedule=fixed", "lr=3e-3", "epochs=2"]


@pytest.fixture
def compose_cfg():
    """``compose_cfg(overrides, hydra=False)``: the config ``python -m numexp OVERRIDES`` would run."""
    config.register()

    def _compose(overrides=(), hydra=False):
        with initialize_config_module(config_module="numexp.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)

    return _compose


@pytest.fixture
def run_cli(tmp_path):
    """``run_cli(*args, env=None)``: ``python -m numexp ARGS`` in ``tmp_path`` (its results/ land there);
    ``env`` defaults to :func:`cli_env`."""

    def _run(*args, timeout=300, env=None):
        return subprocess.run([sys.executable, "-m", "numexp", *args], cwd=tmp_path, env=env or cli_env(),
                              capture_output=True, text=True, timeout=timeout)

    return _run


@pytest.fixture(scope="session")
def shared_data():
    """The real data root: ``$NUMEXP_DATA_ROOT``, else ``../shared/data`` next to the repository."""
    root = Path(os.environ.get("NUMEXP_DATA_ROOT") or REPO.parent / "shared" / "data")
    if not root.is_dir():
        pytest.skip(f"no shared data at {root} (set NUMEXP_DATA_ROOT)")
    return root


def wait_while_running(proc, condition, timeout=120, poll=0.002):
    """Return as soon as ``condition()`` holds, failing if ``proc`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended before the condition held:\n{proc.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(poll)


def cli_env(**extra):
    """The environment for ``python -m numexp`` subprocesses: the user's, without HYDRA_FULL_ERROR."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(extra)
    return env


def run_cli_many(cwd, commands, parallel=2, timeout=300, env=None):
    """Run ``python -m numexp ARGS`` for every ARGS in ``commands``, ``parallel`` at a time, in ``cwd``.

    Returns:
        one ``subprocess.CompletedProcess`` per command, in order.
    """
    env = env or cli_env()
    results, running, queue = [None] * len(commands), {}, list(enumerate(commands))
    while queue or running:
        while queue and len(running) < parallel:
            i, args = queue.pop(0)
            running[i] = (args, subprocess.Popen([sys.executable, "-m", "numexp", *args], cwd=cwd, env=env,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        i = next(iter(running))
        args, proc = running.pop(i)
        out, err = proc.communicate(timeout=timeout)
        results[i] = subprocess.CompletedProcess(args, proc.returncode, out, err)
    return results
