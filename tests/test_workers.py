"""Starting a multirun's joblib workers early (numexp.workers): with the launcher's own settings, so
that its Parallel runs the jobs on the same, already importing, worker processes."""
import os

from joblib import Parallel, delayed
from omegaconf import OmegaConf

from numexp import workers


def launcher_cfg(compose_cfg, *overrides):
    return compose_cfg(list(overrides), hydra=True).hydra.launcher


def test_settings_are_the_launchers(compose_cfg):
    settings = workers.joblib_settings(launcher_cfg(compose_cfg, "hydra.launcher.n_jobs=2"))
    assert settings["n_jobs"] == 2 and settings["backend"] == "loky" and "_target_" not in settings
    # Hydra's launcher turns numeric strings into numbers before it builds its Parallel
    settings = workers.joblib_settings(launcher_cfg(compose_cfg, "hydra.launcher.max_nbytes='1000'"))
    assert settings["max_nbytes"] == 1000


def test_other_launchers_and_one_job_at_a_time_start_nothing(compose_cfg):
    assert workers.joblib_settings(OmegaConf.create({"_target_": "some.other.Launcher"})) is None
    assert workers.joblib_settings(None) is None
    assert workers.start(launcher_cfg(compose_cfg, "hydra.launcher.n_jobs=1")) is None


def test_the_launcher_runs_on_the_started_workers(compose_cfg):
    cfg = launcher_cfg(compose_cfg, "hydra.launcher.n_jobs=2")
    thread = workers.start(cfg)
    thread.join(timeout=60)
    assert not thread.is_alive()
    started = thread.worker_pids
    assert 1 <= len(started) <= 2 and os.getpid() not in started

    def imported(_):
        import sys
        return os.getpid(), {"numexp.trainer", "hydra_plugins.hydra_joblib_launcher._core"} <= set(sys.modules)

    # the launcher's settings reuse the started processes (joblib would replace them for other
    # settings), and they already hold what a job imports
    ran = Parallel(**workers.joblib_settings(cfg))(delayed(imported)(i) for i in range(8))
    reused = [ok for pid, ok in ran if pid in started]
    assert reused and all(reused)
