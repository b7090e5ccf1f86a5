"""``numexp plan [OVERRIDES]``: the runs ``numexp -m OVERRIDES`` would start and how long they would take.

    numexp plan +experiment=reg_sweep epochs=6 reg=0,1e-4
    python -m numexp.plan model=mlp seed=0,1,2,3 hydra.launcher.n_jobs=2

The arguments are exactly those of the multirun, without ``-m``. It prints one line per run (job
number, its overrides, its estimated time), the seconds per training step measured, the number of
runs, and the wall time over the launcher's parallelism; for a cluster launcher (submitit, Ray) the
time limit to give each job. It starts no run and writes nothing.

How the jobs are found: the sweep's config is composed as ``numexp -m`` composes it, and Hydra's
own :class:`BasicSweeper` splits ``hydra.sweeper.params`` plus the command-line overrides into one
override list per job, in Hydra's job order; each job is then composed with the compose API
(what the launcher does), validated and checked against its data.

How long a run takes: for each distinct (model, input shape, batch size, loss, optimizer, threads)
a few training steps of the real numexp model are timed on random float32 data, after a warm-up
step, with the job's BLAS threads, plus one evaluation pass and the per-epoch checkpoint
serialisation. A run is then ``epochs x (steps x step time + evaluation of val and test + saving)
+ start-up`` (composition, loading the data, building the model). Early stopping (``patience``)
can only make a run shorter, so such estimates are upper bounds. Timings come from this machine
as it is now: a busy machine gives pessimistic numbers, other nodes of a cluster other ones.
"""
import heapq
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from threadpoolctl import threadpool_limits

from numexp import callbacks, config, data, rundir, sweep, trainer
from numexp.data import cache
from numexp.status import duration

USAGE = ("usage: numexp plan [OVERRIDES]  (the arguments of `numexp -m ...` without -m: the runs it would "
         "start and their estimated time; starts nothing, writes nothing)")
# a bad command line, config value, output folder or data root: one line, exit code 2
USER_ERRORS = (HydraException, OmegaConfBaseException, config.ConfigError, rundir.RunDirError, data.DataError)
# accepted and ignored, so that a multirun command line can be pasted as it is
MULTIRUN_FLAGS = ("-m", "--multirun", "+plan=true")

# step timing: after one warm-up step, at least MIN_STEPS timed steps, more while within the budget
MIN_STEPS, MAX_STEPS, STEP_BUDGET_SECONDS = 3, 20, 1.0
# evaluation: the median of EVAL_PASSES timed passes over EVAL_PROBE images (the per-image cost
# hardly changes beyond a few hundred), after a warm-up pass
EVAL_PROBE, EVAL_PASSES = 256, 3
# Fixed costs, as multiples of the time a fresh python takes to import numexp on this machine now
# (measured by the plan; calibrated on joblib sweeps of a 2-core machine): the sweep's own start-up
# before it launches (imports, plugins, callbacks; its compositions are measured), a worker process
# starting (loky, or submitit/Ray's process per run), a run's setup in its worker (Hydra's job files,
# logging, provenance), writing runs.csv and shutting the workers down at the end.
SWEEP_START_FACTOR, WORKER_START_FACTOR, RUN_SETUP_FACTOR, COLLECT_FACTOR = 3.0, 3.0, 1.0, 3.0
# metrics.csv, status.json, confusion.csv each epoch (fsync'd)
EPOCH_FILES_SECONDS = 0.01
# per-job time limit for a cluster scheduler: the longest run times this margin (other nodes, noise)
TIME_LIMIT_MARGIN = 1.5


@dataclass
class DataFacts:
    """What a run's data set gives the estimate; ``in_shape``/``num_classes`` as :class:`data.Dataset` has them."""
    name: str
    in_shape: tuple
    num_classes: int
    n_train: int
    n_val: int
    n_test: int
    load_seconds: float
    cache_hit: Optional[bool]


@dataclass
class StepTiming:
    """Measured costs of one (model, input, batch, loss, optimizer, threads) combination, in seconds."""
    description: str
    train_step: float
    steps_timed: int
    eval_image: float
    save: float
    build: float


@dataclass
class Job:
    """One run of the sweep: its number, overrides, composed task config and estimate."""
    num: int
    overrides: List[str]
    batch: int
    cfg: object = field(repr=False)
    compose_seconds: float
    # new, continue (resume from its last epoch) or skipped (already completed)
    state: str = "new"
    epochs_done: int = 0
    data_key: str = ""
    timing_key: str = ""
    epochs: int = 0
    steps: int = 0
    # seconds = epochs x epoch_seconds + startup
    epoch_seconds: float = 0.0
    startup: float = 0.0
    seconds: float = 0.0
    upper_bound: bool = False


@dataclass
class Launcher:
    """How the runs are spread: ``slots`` runs at once (None: all of a batch at once, or unknown)."""
    name: str
    detail: str
    slots: Optional[int]
    cluster: bool
    timeout_min: Optional[float] = None


@dataclass
class Plan:
    """Everything :func:`plan_text` prints; ``wall`` is None when it depends on an unknown cluster."""
    jobs: List[Job]
    data: dict
    timings: dict
    launcher: Launcher
    cores: int
    overhead: float
    wall: Optional[float]
    notes: List[str]


# --------------------------------------------------------------------------- the jobs, as Hydra would make them

def compose_sweep(overrides):
    """The multirun's own config, composed exactly as ``numexp -m OVERRIDES`` composes it.

    The compose API composes single runs only (it refuses ``reg=0,1e-4``), so this goes through the
    same call Hydra's multirun makes. Call inside :func:`initialize_config_module`.
    """
    hydra = GlobalHydra.instance().hydra
    return hydra.compose_config(config_name="config", overrides=list(overrides), run_mode=RunMode.MULTIRUN,
                                from_shell=True, with_log_configuration=False)


def job_batches(sweep_cfg):
    """One override list per job, in Hydra's job order, grouped in the batches the sweeper launches.

    ``hydra.sweeper.params`` come first, then the command-line overrides; for the same key the
    command line wins (Hydra's :meth:`BasicSweeper.split_arguments` does this).
    """
    sweeper = sweep_cfg.hydra.sweeper
    if not str(sweeper._target_).endswith(".BasicSweeper"):
        raise config.ConfigError(f"numexp plan knows Hydra's basic sweeper only, not {sweeper._target_}")
    # the sweeper's own formatting of its params (BasicSweeper._parse_config)
    params = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
    parsed = parser.parse_overrides(params + list(sweep_cfg.hydra.overrides.task))
    return BasicSweeper.split_arguments(parsed, sweeper.max_batch_size)


def compose_job(sweep_cfg, num, overrides):
    """The config job ``num`` runs with: what the launcher composes (the sweep's Hydra overrides, then
    the job's), with the sweep's resolved values (``${now:...}``) and ``hydra.job.num`` set."""
    cfg = compose(config_name="config", overrides=list(sweep_cfg.hydra.overrides.hydra) + list(overrides),
                  return_hydra_config=True)
    OmegaConf.copy_cache(from_config=sweep_cfg, to_config=cfg)
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = num
    return cfg


def make_jobs(overrides):
    """``(sweep_cfg, jobs)``: compose the sweep and every job; check the values, as the real command would.

    Raises:
        the errors of :data:`USER_ERRORS`: a bad override, an unknown key, a bad value or a model that
        does not fit the input (naming the job), a sweep folder that cannot be used.
    """
    config.register()
    with initialize_config_module(config_module="numexp.conf", version_base="1.3"):
        sweep_cfg = compose_sweep(overrides)
        # what CheckBeforeStart does before a multirun: a non-empty folder needs resume=true, same command
        sweep.check_sweep_folder(sweep_cfg)
        jobs, num = [], 0
        for batch_index, batch in enumerate(job_batches(sweep_cfg)):
            for job_overrides in batch:
                start = time.perf_counter()
                cfg = compose_job(sweep_cfg, num, job_overrides)
                jobs.append(Job(num, list(job_overrides), batch_index, cfg, time.perf_counter() - start))
                num += 1
    for job in jobs:
        task = config.task_config(job.cfg)
        try:
            config.validate(task)
            config.check_model_fits(task)
        except config.ConfigError as e:
            raise config.ConfigError(f"job {job.num} ({' '.join(job.overrides)}): {e}") from None
        if task.resume:
            job.state, job.epochs_done = resume_state(run_folder(job.cfg))
        job.cfg = task
    return sweep_cfg, jobs


def run_folder(job_cfg):
    """Where the job writes: ``hydra.sweep.dir/hydra.sweep.subdir``."""
    return Path(job_cfg.hydra.sweep.dir) / str(job_cfg.hydra.sweep.subdir)


def resume_state(run_dir):
    """``(state, epochs_done)`` of a job under ``resume=true``: ``skipped`` when its folder holds a
    completed run, ``continue`` from the epoch of its ``last.npz``, else ``new``."""
    try:
        if (run_dir / rundir.SUMMARY).is_file() and \
                rundir.read_json(run_dir / rundir.SUMMARY).get("status") == "completed":
            return "skipped", 0
        if (run_dir / rundir.LAST).is_file() and (run_dir / rundir.STATUS).is_file():
            # status.json is written right after last.npz: its epoch is at most last.npz's
            return "continue", int(rundir.read_json(run_dir / rundir.STATUS).get("epoch") or 0)
    except (OSError, ValueError, TypeError):
        pass  # an unreadable file: the run starts over, count it whole
    return "new", 0


# --------------------------------------------------------------------------- data and timing

def data_key(task):
    return json.dumps({"name": task.data.name, **config.options(task.data)}, sort_keys=True)


def load_facts(task):
    """Load the job's data set once (as the trainer does) for its shape, classes and split sizes."""
    start = time.perf_counter()
    with cache.no_writes():  # the plan writes nothing, not even a data cache
        ds = data.load(task.data.name, **config.options(task.data))
    return DataFacts(task.data.name, ds.in_shape, ds.num_classes, len(ds.y_train), len(ds.y_val), len(ds.y_test),
                     time.perf_counter() - start, ds.info.get("cache_hit"))


def timing_key(task, facts):
    """What a training step's time depends on; jobs sharing it share one measurement.

    ``lr`` and ``reg`` are left out: ``reg`` adds one multiply-add per weight, lost in the noise.
    """
    return json.dumps({"model": _container(task.model), "in_shape": facts.in_shape, "classes": facts.num_classes,
                       "batch_size": min(int(task.batch_size), facts.n_train), "loss": _container(task.loss),
                       "optim": _container(task.optim), "threads": int(task.threads),
                       "augment": _container(task.augment), "eval_batch_size": int(task.eval_batch_size)},
                      sort_keys=True)


def measure(task, facts):
    """Time the job's real model, loss and optimizer on random data of its shape with its BLAS threads.

    Raises:
        config.ConfigError: the model does not fit the input, or a component refuses its options.
    """
    rng = np.random.default_rng(0)
    with threadpool_limits(limits=int(task.threads)), np.errstate(all="ignore"):
        start = time.perf_counter()
        model = trainer.build_model(task, facts, rng)
        model.set_input_grad(False)
        loss_fn, opt, _, augment = trainer.build_components(task, model)
        opt.fuse_into_backward()  # as the trainer does
        build = time.perf_counter() - start
        step_times = time_train_steps(model, loss_fn, opt, augment, facts, int(task.batch_size), rng)
        eval_image = time_eval(model, facts, int(task.eval_batch_size), rng)
        save = time_save(model, opt)
    return StepTiming(describe(task, facts), statistics.median(step_times), len(step_times), eval_image, save,
                      build)


def time_train_steps(model, loss_fn, opt, augment, facts, batch_size, rng):
    """Seconds of each timed training step (batch gather and augmentation included), after a warm-up
    step that pays the first call's allocations and starts the BLAS threads."""
    batch = max(1, min(batch_size, facts.n_train))
    x = rng.standard_normal((2 * batch, *facts.in_shape), dtype=np.float32)
    y = rng.integers(0, facts.num_classes, size=2 * batch)

    def endless_batches():
        while True:
            yield from data.batches(x, y, batch, rng=rng, augment=augment, drop_last=True)

    stream = endless_batches()
    model.train()
    _train_step(model, loss_fn, opt, *next(stream))
    times, deadline = [], time.perf_counter() + STEP_BUDGET_SECONDS
    while len(times) < MIN_STEPS or (len(times) < MAX_STEPS and time.perf_counter() < deadline):
        start = time.perf_counter()
        _train_step(model, loss_fn, opt, *next(stream))
        times.append(time.perf_counter() - start)
    return times


def _train_step(model, loss_fn, opt, xb, yb):
    """The work of one step of :meth:`numexp.trainer.Trainer.train_epoch`."""
    scores = model(xb)
    _, dscores = loss_fn(scores, yb)
    model.backward(dscores)
    opt.step()
    np.count_nonzero(scores.argmax(axis=1) == yb)


def time_eval(model, facts, eval_batch_size, rng):
    """Seconds per image of an evaluation pass in eval mode (the median pass, after a warm-up pass)."""
    n = max(1, min(eval_batch_size, facts.n_val + facts.n_test, EVAL_PROBE))
    x = rng.standard_normal((n, *facts.in_shape), dtype=np.float32)
    model.eval()
    model(x).argmax(axis=1)
    times = []
    for _ in range(EVAL_PASSES):
        start = time.perf_counter()
        model(x).argmax(axis=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / n


def time_save(model, opt):
    """Seconds to serialise what a run saves each epoch: ``last.npz`` (model, best model, optimizer
    state) and ``checkpoint.npz`` (the best model, when it improved), in memory."""
    state = model.state_dict()
    arrays = {**{f"model/{k}": v for k, v in state.items()}, **{f"best/{k}": v for k, v in state.items()}}
    for name, value in opt.state.items():
        slots = value if isinstance(value, dict) else {"": value}
        arrays.update((f"optim/{name}/{slot}", v) for slot, v in slots.items())
    start = time.perf_counter()
    np.savez(io.BytesIO(), **arrays)
    np.savez(io.BytesIO(), **state)
    return time.perf_counter() - start


def describe(task, facts):
    """``mlp(hidden=[32]) on (1, 8, 8), 10 classes, batch 32, adam, softmax, threads 1``."""
    options = {k: v for k, v in config.options(task.model).items() if k not in ("init", "init_std")}
    shown = ", ".join(f"{k}={_compact(v)}" for k, v in options.items())
    model = task.model.name + (f"({shown})" if shown else "")
    extras = ["+".join(task.augment.names)]
    return ", ".join([f"{model} on {facts.in_shape}", f"{facts.num_classes} classes",
                      f"batch {min(int(task.batch_size), facts.n_train)}", task.optim.name, task.loss.name,
                      *filter(None, extras), f"threads {int(task.threads)}"])


def _compact(value):
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _container(node):
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


# --------------------------------------------------------------------------- estimates and schedule

def estimate(job, facts, timing, process_start, fresh_process):
    """Fill in the job's epochs (those still to train), steps per epoch and seconds.

    Args:
        process_start: seconds for a fresh python to import numexp (:func:`time_process_start`).
        fresh_process: the launcher starts a process per run (submitit, Ray), not a reused worker.
    """
    task = job.cfg
    steps = math.ceil(facts.n_train / int(task.batch_size))
    if int(task.max_steps):
        steps = min(steps, int(task.max_steps))
    job.epochs = max(0, trainer.planned_epochs(task) - job.epochs_done)
    job.steps = steps
    job.upper_bound = int(task.patience) > 0
    job.epoch_seconds = (steps * timing.train_step + (facts.n_val + facts.n_test) * timing.eval_image
                         + timing.save + EPOCH_FILES_SECONDS)
    setup = RUN_SETUP_FACTOR + (WORKER_START_FACTOR if fresh_process else 0.0)
    job.startup = job.compose_seconds + facts.load_seconds + timing.build + setup * process_start
    job.seconds = job.epochs * job.epoch_seconds + job.startup


def available_cores():
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def joblib_workers(n_jobs, cores):
    """joblib's meaning of ``n_jobs``: -1 = every core, -2 = all but one, ..., None = 1."""
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    if n_jobs < 0:
        return max(1, cores + 1 + n_jobs)
    if n_jobs == 0:
        raise config.ConfigError("hydra.launcher.n_jobs=0 is invalid: use a positive number, or -1 for every core")
    return n_jobs


def describe_launcher(launcher_cfg, threads, cores):
    """The launcher's parallelism, from its config (``hydra.launcher``); nothing is started."""
    target = str(launcher_cfg.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n_jobs = launcher_cfg.get("n_jobs")
        return Launcher("joblib", f"n_jobs={n_jobs}", joblib_workers(n_jobs, cores), cluster=False)
    if target.endswith("submitit_launcher.LocalLauncher"):
        # submitit's local executor starts every job of a batch at once
        return Launcher("submitit_local", "every run of a batch (hydra.sweeper.max_batch_size) at once", None,
                        cluster=False, timeout_min=launcher_cfg.get("timeout_min"))
    if target.endswith("SlurmLauncher"):
        parallelism = launcher_cfg.get("array_parallelism")
        return Launcher("submitit_slurm", f"array_parallelism={parallelism}", parallelism, cluster=True,
                        timeout_min=launcher_cfg.get("timeout_min"))
    if "RayLauncher" in target:
        if OmegaConf.select(launcher_cfg, "ray.init.address") is None:
            # without an address the sweep starts a Ray of its own here; each run asks for `threads` CPUs
            return Launcher("ray", f"a Ray of its own on this machine, {threads} CPU(s) per run",
                            max(1, cores // threads), cluster=False)
        return Launcher("ray", f"{threads} CPU(s) per run on the cluster", None, cluster=True)
    if target.endswith("BasicLauncher"):
        return Launcher("basic", "one run after the other", 1, cluster=False)
    return Launcher(target.rpartition(".")[2] or "unknown", "unknown parallelism: assuming one run at a time", 1,
                    cluster=False)


def schedule(durations, slots):
    """Wall time of ``durations`` run in order on ``slots`` workers, each run going to the first free one
    (how joblib hands out jobs)."""
    free = [0.0] * max(1, min(slots, len(durations)))
    for seconds in durations:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free) if durations else 0.0


def sweep_overhead(jobs, launcher, process_start):
    """Seconds the sweep spends outside its runs: starting up, composing every job before launching
    (Hydra checks them all first), starting the joblib workers, writing runs.csv at the end."""
    factor = SWEEP_START_FACTOR + COLLECT_FACTOR + (WORKER_START_FACTOR if launcher.name == "joblib" else 0.0)
    return factor * process_start + sum(job.compose_seconds for job in jobs)


def time_process_start():
    """Seconds a fresh python takes to import numexp's trainer here and now: the unit of the fixed costs
    (a busy machine makes it longer, as it makes them). Writes no bytecode."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numexp.trainer"], env=env, capture_output=True, check=False,
                   timeout=120)
    return time.perf_counter() - start


def wall_time(jobs, launcher, threads, cores, notes):
    """The sweep's wall time over the launcher's parallelism (None when it depends on an unknown
    cluster); warns in ``notes`` when the runs at once want more cores than there are."""
    batches = {}
    for job in jobs:
        if job.state != "skipped":
            batches.setdefault(job.batch, []).append(job.seconds)
    if launcher.slots is None and launcher.cluster:
        return None
    at_once = max((len(b) if launcher.slots is None else min(launcher.slots, len(b)) for b in batches.values()),
                  default=0)
    slowdown = 1.0
    if not launcher.cluster and at_once * threads > cores:
        slowdown = at_once * threads / cores
        notes.append(f"warning: {at_once} runs at once x threads={threads} = {at_once * threads} threads on "
                     f"{cores} cores: the runs would slow each other (estimate scaled by {slowdown:.1f}); "
                     f"lower hydra.launcher.n_jobs or threads")
    total = 0.0
    for durations in batches.values():
        slots = len(durations) if launcher.slots is None else launcher.slots
        total += schedule([d * slowdown for d in durations], slots)
    return total


def time_limit_minutes(jobs):
    """The per-job time limit to give a scheduler: the longest run with a margin, in whole minutes."""
    longest = max((job.seconds for job in jobs if job.state != "skipped"), default=0.0)
    return max(1, math.ceil(longest * TIME_LIMIT_MARGIN / 60))


# --------------------------------------------------------------------------- the plan

def make_plan(overrides):
    """Compose the jobs, measure each distinct model/input once, estimate every run and the sweep."""
    sweep_cfg, jobs = make_jobs(overrides)
    cores = available_cores()
    threads = max((int(job.cfg.threads) for job in jobs if job.state != "skipped"), default=1)
    launcher = describe_launcher(sweep_cfg.hydra.launcher, threads, cores)
    process_start = time_process_start()
    facts, timings = {}, {}
    for job in (job for job in jobs if job.state != "skipped"):
        job.data_key = data_key(job.cfg)
        if job.data_key not in facts:
            facts[job.data_key] = load_facts(job.cfg)
        job.timing_key = timing_key(job.cfg, facts[job.data_key])
        if job.timing_key not in timings:
            timings[job.timing_key] = measure(job.cfg, facts[job.data_key])
        estimate(job, facts[job.data_key], timings[job.timing_key], process_start,
                 fresh_process=launcher.name in ("submitit_local", "submitit_slurm", "ray"))
    notes = machine_notes(cores) + data_notes(facts.values())
    overhead = sweep_overhead(jobs, launcher, process_start)
    wall = wall_time(jobs, launcher, threads, cores, notes)
    return Plan(jobs, facts, timings, launcher, cores, overhead,
                None if wall is None else wall + overhead, notes)


def machine_notes(cores):
    """A warning when other work already loads the cores: the timings are then pessimistic."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return []
    if load > 0.5 * cores:
        return [f"note: this machine is busy (load {load:.1f} on {cores} cores): the timings are pessimistic"]
    return []


def data_notes(all_facts):
    return [f"note: {f.name} had no cache: loading decoded the images ({duration(f.load_seconds)}); each run pays "
            f"this until the sweep's first run has written the cache" for f in all_facts if f.cache_hit is False]


def plan_text(plan):
    """The printed plan: runs, measurements, count, per-run and wall estimates."""
    lines = [_jobs_table(plan.jobs), "measured on this machine:"]
    for timing in plan.timings.values():
        lines.append(f"  {timing.description}: {_short(timing.train_step)}/step (median of {timing.steps_timed} "
                     f"steps), eval {_short(timing.eval_image)}/image, save {_short(timing.save)}/epoch, "
                     f"build {_short(timing.build)}")
    for f in plan.data.values():
        lines.append(f"  data {f.name}: {f.in_shape}, {f.num_classes} classes, {f.n_train} train / {f.n_val} val / "
                     f"{f.n_test} test images, loaded in {f.load_seconds:.2f}s")
    lines += [_count_line(plan.jobs), *_time_lines(plan), *plan.notes]
    return "\n".join(lines)


def _jobs_table(jobs):
    rows = [("job", "estimate", "overrides")]
    for job in jobs:
        if job.state == "skipped":
            when = "skipped (completed)"
        else:
            when = ("<= " if job.upper_bound else "") + _seconds(job.seconds)
            if job.state == "continue":
                when += f" (from epoch {job.epochs_done})"
        rows.append((str(job.num), when, " ".join(job.overrides)))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}".rstrip() for r in rows)


def _count_line(jobs):
    todo = [job for job in jobs if job.state != "skipped"]
    skipped = len(jobs) - len(todo)
    line = f"{len(todo)} run{'' if len(todo) == 1 else 's'} to start"
    if skipped:
        line += f" ({skipped} skipped: completed)"
    if todo:
        low, high = min(j.seconds for j in todo), max(j.seconds for j in todo)
        span = _seconds(low) if _seconds(low) == _seconds(high) else f"{_seconds(low)} to {_seconds(high)}"
        epochs = sorted({j.epochs for j in todo})
        steps = sorted({j.steps for j in todo})
        line += (f"; per run {'at most ' if any(j.upper_bound for j in todo) else ''}{span} "
                 f"({'/'.join(map(str, epochs))} epochs x {'/'.join(map(str, steps))} steps)")
    return line


def _time_lines(plan):
    """The wall time over the launcher's parallelism; for a cluster launcher, the per-job time."""
    launcher, lines = plan.launcher, []
    todo = [j for j in plan.jobs if j.state != "skipped"]
    longest = max((j.seconds for j in todo), default=0.0)
    bound = "at most " if any(j.upper_bound for j in todo) else ""
    where = f"{launcher.name}, {launcher.detail}" + ("" if launcher.cluster else f", {plan.cores} cores")
    if plan.wall is None:
        lines.append(f"wall time: depends on the cluster ({where}): {bound}about {_seconds(longest)} per round "
                     f"of runs at once")
    elif launcher.cluster:
        lines.append(f"wall time: {bound}about {_seconds(plan.wall)} if the cluster runs that many at once "
                     f"({where}), plus the queue wait")
    else:
        lines.append(f"wall time: {bound}about {_seconds(plan.wall)} ({where}; start-up and runs.csv "
                     f"{_seconds(plan.overhead)} included)")
    if launcher.timeout_min is not None:
        lines.append(f"per-job time limit: hydra.launcher.timeout_min={time_limit_minutes(plan.jobs)} (the longest "
                     f"run, {_seconds(longest)}, x {TIME_LIMIT_MARGIN}; timed on this machine, nodes differ)")
        if float(launcher.timeout_min) * 60 < longest:
            lines.append(f"warning: hydra.launcher.timeout_min={launcher.timeout_min} is shorter than the longest "
                         f"run: it would be killed")
    elif launcher.cluster:
        lines.append(f"per-job time: {bound}about {_seconds(longest)} (the longest run; timed on this machine, "
                     f"nodes differ)")
    return lines


def _short(seconds):
    """``1.72 ms``, ``355 us``, ``2.1 s``: short measured times."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            return f"{seconds / scale:.3g} {unit}"


def _seconds(seconds):
    """Durations under a minute with a decimal (tiny runs), longer ones as ``status`` shows them."""
    return f"{seconds:.1f}s" if seconds < 60 else duration(seconds)


def main(argv=None):
    """Print the plan; exit code 0, or 2 with one line for a bad command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        print(f"numexp: error: numexp plan takes the overrides of a multirun, not {flags[0]} (numexp plan -h)",
              file=sys.stderr)
        return 2
    try:
        plan = make_plan(overrides)
    except USER_ERRORS as e:
        callbacks.exit_with_user_error(e)
    print(plan_text(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
