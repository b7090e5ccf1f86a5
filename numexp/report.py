"""Experiment reports, regenerated from the runs on disk by one command.

    python -m numexp.report svm_vs_softmax                 # runs under results/ -> experiments/svm_vs_softmax/
    python -m numexp.report --all                          # every experiment found, plus experiments/README.md
    python -m numexp.report reg_sweep --runs results other/results --out experiments

A report is a function of the runs table (:mod:`numexp.runs`) and the run folders' files
(``metrics.csv``, ``summary.json``; ``checkpoint.npz`` and the data only for the confusion
matrix, which is skipped with a note when either is missing). It writes into
``<out>/<EXPERIMENT>/``:

- ``README.md``: question, protocol, tables, the seed's published numbers beside ours, a
  computed verdict, figures, the runs that did not complete;
- ``table.csv`` (one row per configuration: mean, std, 95% t interval over seeds, ...),
  ``difference.csv`` (experiments comparing two arms: the difference paired by seed),
  ``runs.csv`` (the experiment's runs table), ``confusion_matrix.csv``;
- ``curves.png`` (test accuracy and training loss per epoch), ``accuracy_vs_reg.png``
  (reg_sweep), ``confusion.png``.

Runs of one experiment are the runs whose ``+experiment=NAME`` override (or config) names it,
from any number of sweep folders. When the same configuration and seed was run more than
once (a sweep resumed in another session), the last completed run counts and the others are
listed as superseded. Reports are deterministic: sorted rows, fixed number formats, no
timestamps and no matplotlib version in the PNGs, so regenerating them from the same runs
gives identical files (figures are rendered headless, with Agg).
"""
import argparse
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from numexp import runs as runs_mod
from numexp import stats
from numexp.atomic import atomic_open
from numexp.rundir import CHECKPOINT, METRICS, SUMMARY, atomic_write_text, read_json

REPORTS_DIR = "experiments"
# what a report may write; a regenerated report removes the ones it no longer produces
GENERATED = ("README.md", "table.csv", "difference.csv", "runs.csv", "confusion_matrix.csv", "curves.png",
             "accuracy_vs_reg.png", "confusion.png")
# the run's own confusion matrix (same format as the report's confusion_matrix.csv), if the trainer wrote one
RUN_CONFUSION = "confusion.csv"
# a report keeps copies of its runs' small files in <report>/runs/<sweep>/<job>/, so it can be regenerated
# from the repository alone; never checkpoints (tens of MB) or data
RUNS_SUBDIR = "runs"
# hand-written notes beside the reports (the reduced protocol and its commands), linked from the index
PROTOCOL = "PROTOCOL.md"
ARCHIVED = (".hydra/config.yaml", ".hydra/overrides.yaml", METRICS, SUMMARY, RUN_CONFUSION, "status.json",
            "numexp.log")
# no software version or date in the PNG: identical bytes across regenerations
PNG_METADATA = {"Software": None}
RC = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8,
      "axes.grid": True, "grid.alpha": 0.3}
SEED_KEY = "seed"
CONFIDENCE = 0.95
# table.csv, after the configuration keys
GROUP_COLUMNS = ["n_runs", "seeds", "test_acc_mean", "test_acc_std", "test_acc_ci_low", "test_acc_ci_high",
                 "test_acc_min", "test_acc_max", "val_acc_mean", "best_epoch_mean", "best_epochs",
                 "peak_test_acc_mean", "epochs_run_mean", "train_seconds_mean", "seconds_per_epoch"]
# more lines than this in one panel: seed bands would hide each other
MAX_BANDS = 4
GTSRB_SPLIT_NOTE = (
    "The seed's numbers are single runs scored on a random 80/20 split of the GTSRB training set: frames of "
    "one physical sign (a track) fall on both sides of such a split, which inflates accuracy. Our runs pick "
    "the model on a validation split that keeps whole tracks together; the protocol's split row says what "
    "our test accuracy is measured on.")


class ReportError(Exception):
    """No runs for an experiment, or another problem the message explains."""


@dataclass(frozen=True)
class Spec:
    """What one experiment's report shows.

    Attributes:
        title: heading of the README.
        question: the question the experiment answers, in one sentence.
        dataset: the data set the seed used (a different one gets a warning in the report).
        primary: config keys naming a configuration, most important first.
        compare: (key, a, b): report ``a - b`` paired by seed, e.g. ("loss.name", "softmax", "svm_l2").
        published: the seed's numbers, ``{value of compare key: accuracy}``.
        published_text: the seed's result in words (markdown).
        panel: config key whose values get one column of curve panels each.
        seed_protocol: the seed's settings, ``{config key: value}``; the report lists where ours differ.
        peak: also show the peak test accuracy over epochs (optimistic: that epoch is picked on the test
            set; shown because single-run reports often quote it).
    """
    title: str
    question: str
    dataset: str = None
    primary: tuple = ()
    compare: tuple = None
    published: dict = field(default_factory=dict)
    published_text: str = "The seed published no numbers for this experiment."
    panel: str = None
    seed_protocol: dict = field(default_factory=dict)
    peak: bool = False


# the GTSRB seed's SimpleNet protocol (issue 3): plain SGD at lr 1e-3, batch 64, no augmentation, 60 epochs,
# the dynamic schedule dropping the lr /10 every 20 epochs, the whole training set
GTSRB_PROTOCOL = {"model.name": "simplenet", "optim.name": "sgd", "lr": 1e-3, "batch_size": 64, "epochs": 60,
                  "schedule.step_size": 20, "schedule.factor": 10.0, "augment.names": "[]", "data.fraction": 1.0}

SPECS = {
    "svm_vs_softmax": Spec(
        title="L2-SVM vs softmax loss: SimpleNet on GTSRB",
        question="Does SimpleNet trained with the L2-SVM (squared hinge) loss classify traffic signs as well as "
                 "with softmax cross-entropy?",
        dataset="gtsrb", primary=("loss.name",), compare=("loss.name", "softmax", "svm_l2"),
        published={"svm_l2": 0.9818, "softmax": 0.9855},
        published_text="cnn-svm (L2-SVM) 98.18% vs cnn-softmax 98.55% test accuracy, one run each: softmax ahead "
                       "by 0.37 points.",
        seed_protocol={**GTSRB_PROTOCOL, "reg": 0.0, "schedule.name": "dynamic"}, peak=True),
    "reg_sweep": Spec(
        title="Regularisation sweep: L1-SVM and L2-SVM losses on GTSRB",
        question="How does the L2 weight penalty `reg` change SimpleNet's test accuracy with the L1-SVM (hinge) "
                 "and L2-SVM (squared hinge) losses, and is L2-SVM at least as good as L1-SVM?",
        dataset="gtsrb", primary=("reg", "loss.name"), panel="loss.name",
        published_text="a reg x {L1-SVM, L2-SVM} table of single runs with test accuracies from 93.27% to "
                       "98.08%; L2-SVM at or above L1-SVM at most values of reg.",
        seed_protocol={**GTSRB_PROTOCOL, "schedule.name": "dynamic"}),
    "lr_schedule": Spec(
        title="Fixed vs dynamic learning rate: SimpleNet on GTSRB",
        question="Does the dynamic schedule (lr divided by 10 every 20 epochs, restarting from the best model) "
                 "beat a fixed lr of 1e-3?",
        dataset="gtsrb", primary=("schedule.name",), compare=("schedule.name", "dynamic", "fixed"),
        published={"dynamic": 0.9783, "fixed": 0.9587},
        published_text="dynamic 97.83% vs fixed 95.87% test accuracy, one run each: dynamic ahead by 1.96 points.",
        seed_protocol=GTSRB_PROTOCOL, peak=True),
    "lenet5_mnist": Spec(
        title="LeNet-5 on MNIST: classic vs modern activations and pooling",
        question="How much do ReLU and max pooling gain over LeNet-5's classic sigmoid and average pooling, in "
                 "accuracy and in time?",
        dataset="mnist", primary=("model.activation", "model.pool"),
        published_text="99.04% test accuracy for the seed's LeNet-5 (lr 1e-3, reg 1e-3, batch 128), one run, trained "
                       "on MNIST's 60,000 training images and scored on its 10,000 test images. Only the test "
                       "images are here, so our runs train on the first 8,000 of them (7,200, and 800 for validation) and "
                       "score on the last 2,000: about 8x less training data, so expect lower accuracy.",
        seed_protocol={"model.name": "lenet5", "lr": 1e-3, "reg": 1e-3, "batch_size": 128}),
    "optimizers": Spec(
        title="Six update rules on SimpleConvNet (MNIST)",
        question="Which update rule trains SimpleConvNet best in a fixed budget of epochs, and at what cost in time?",
        dataset="mnist", primary=("optim.name", "lr"), panel="lr",
        published_text="The textbook's comparison is a figure of training-loss curves, without accuracies to "
                       "compare with."),
}


# --------------------------------------------------------------------------- gathering runs

def experiment_runs(table, name):
    """Rows of the runs table (from :func:`numexp.runs.gather`) that belong to experiment ``name``."""
    return table[table["experiment"] == name].reset_index(drop=True)


def select_runs(table):
    """Split an experiment's runs into (kept, superseded).

    Runs with identical result-affecting config (seed included) are repeats: if one completed,
    the last completed one (in ``run_dir`` order) is kept and the others are superseded;
    if none completed, all are kept, so failures stay visible.
    """
    keys = [k for k in runs_mod.config_columns(table) if k not in runs_mod.NON_RESULT_KEYS]
    ident = _row_keys(table, keys)
    keep = []
    for key in dict.fromkeys(ident):
        idx = [i for i, k in enumerate(ident) if k == key]
        done = [i for i in idx if table["status"].iloc[i] == "completed"]
        keep.extend(done[-1:] if done else idx)
    mask = np.zeros(len(table), dtype=bool)
    mask[keep] = True
    return table[mask].reset_index(drop=True), table[~mask].reset_index(drop=True)


# --------------------------------------------------------------------------- one report

class Report:
    """Builds one experiment's files from its runs (a subset of the runs table)."""

    def __init__(self, name, table, out_dir, confusion=True, root="."):
        if not len(table):
            raise ReportError(f"no runs of experiment {name}")
        self.name = name
        self.spec = SPECS.get(name) or Spec(title=f"Experiment {name}", question="")
        self.all_runs = table.reset_index(drop=True)
        self.runs, self.superseded = select_runs(self.all_runs)
        self.done = self.runs[(self.runs["status"] == "completed") & self.runs["test_acc"].notna()]
        self.done = self.done.reset_index(drop=True)
        self.out = Path(out_dir)
        self.want_confusion = confusion
        self.written = []
        # run_dir is shown as it is and read relative to root (the report folder for archived runs)
        self.root = Path(root)
        self.summaries = {d: _read_summary(self.root / d) for d in self.runs["run_dir"]}
        self._metrics = {}
        varying = [k for k in runs_mod.differing_keys(self.runs) if k not in runs_mod.NON_RESULT_KEYS]
        self.group_keys = [k for k in varying if k != SEED_KEY]
        # primary keys first, in the spec's order, even when constant (a one-arm sweep still names its arm)
        primary = [k for k in self.spec.primary if k in self.runs.columns]
        self.group_keys = primary + [k for k in self.group_keys if k not in primary]
        self.label_keys = self._label_keys(primary)
        self.dataset = _single(self.runs, "data.name")

    # ---- building blocks

    def write(self):
        """Write every file of the report; returns their paths (sorted)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with matplotlib.rc_context(RC):
            groups = self.group_table()
            sections = [self.header(), self.protocol_section(), self.results_section(groups)]
            sections.append(self.seed_section(groups))
            sections.append(self.figures_section())
            sections.append(self.confusion_section())
            sections.append(self.runs_section())
        self._write_csv("table.csv", groups)
        self._write_csv("runs.csv", runs_mod.tidy(self.all_runs))
        self._write_text("README.md", "\n".join(s.rstrip("\n") + "\n" for s in sections if s))
        for name in GENERATED:
            path = self.out / name
            if path not in self.written and path.exists():
                path.unlink()
        return sorted(self.written)

    def header(self):
        parts = [f"# {self.spec.title}\n",
                 f"_Generated by `python -m numexp.report {self.name}` from the run folders listed at the end; "
                 f"regenerate it rather than editing it._\n"]
        if self.spec.question:
            parts.append(f"**Question.** {self.spec.question}\n")
        verdict = self.verdict(self.group_table())
        if verdict:
            parts.append(f"**Answer.** {verdict}\n")
        if self.spec.dataset and self.dataset and self.dataset != self.spec.dataset:
            parts.append(f"> Note: these runs use `data={self.dataset}`, not `{self.spec.dataset}` as in the seed, "
                         f"so the seed's numbers below are not comparable with ours.\n")
        differences = self.protocol_differences()
        if differences:
            shorter = self._shorter_training()
            parts.append(f"> Note: our protocol differs from the seed's in {differences}."
                         + (" With this much less training the models are far from converged: compare our arms with "
                            "each other, not our accuracies with the seed's." if shorter else "") + "\n")
        return "\n".join(parts)

    def protocol_differences(self):
        """The seed's settings our runs do not share, as text (empty if none): ``epochs 4 (seed: 60)``."""
        out = []
        for key, seed_value in self.spec.seed_protocol.items():
            if key not in self.runs.columns:
                continue
            ours = sorted({runs_mod._value_key(v) for v in self.runs[key].dropna()} - {None}, key=runs_mod._sort_key)
            if any(not _same(v, seed_value) for v in ours):
                out.append(f"`{key}` {', '.join(_fmt_value(v) for v in ours)} (seed: {_fmt_value(seed_value)})")
        return "; ".join(out)

    def _shorter_training(self):
        """Whether our runs train for fewer epochs than the seed's."""
        seed_epochs = self.spec.seed_protocol.get("epochs")
        if seed_epochs is None or "epochs" not in self.runs.columns:
            return False
        return bool((pd.to_numeric(self.runs["epochs"], errors="coerce") < seed_epochs).any())

    def group_table(self):
        """One row per configuration: its keys, seeds, then statistics of the completed runs."""
        if hasattr(self, "_groups"):
            return self._groups
        rows = []
        for key, part in self._groups_of(self.done):
            acc = stats.summarize(part["test_acc"], CONFIDENCE)
            peaks = [self._peak(d) for d in part["run_dir"]]
            row = {**dict(zip(self.group_keys, key)), "n_runs": acc["n"],
                   "seeds": " ".join(str(s) for s in sorted(_ints(part.get(SEED_KEY, [])))),
                   "test_acc_mean": acc["mean"], "test_acc_std": acc["std"],
                   "test_acc_ci_low": acc["ci_low"], "test_acc_ci_high": acc["ci_high"],
                   "test_acc_min": acc["min"], "test_acc_max": acc["max"],
                   "val_acc_mean": _mean(part["val_acc"]), "best_epoch_mean": _mean(part["best_epoch"]),
                   "best_epochs": " ".join(str(int(e)) for e in part["best_epoch"].dropna()),
                   "peak_test_acc_mean": _mean([p[0] for p in peaks]),
                   "epochs_run_mean": _mean(part["epochs_run"]),
                   "train_seconds_mean": _mean(part["train_seconds"]),
                   "seconds_per_epoch": _mean(part["train_seconds"] / part["epochs_run"])}
            if self.spec.compare:
                row["seed_published"] = self.spec.published.get(dict(zip(self.group_keys, key)).get(
                    self.spec.compare[0]), math.nan)
            rows.append(row)
        columns = [*self.group_keys, *GROUP_COLUMNS, *(["seed_published"] if self.spec.compare else [])]
        self._groups = pd.DataFrame(rows, columns=columns)
        return self._groups

    def protocol_section(self):
        sums = [self.summaries[d] for d in self.runs["run_dir"]]
        data_infos = [s.get("data") or {} for s in sums]
        sizes = sorted({_sizes_text(i.get("sizes")) for i in data_infos if i.get("sizes")})
        shapes = sorted({"x".join(map(str, i["in_shape"])) for i in data_infos if i.get("in_shape")})
        splits = sorted({i["split"] for i in data_infos if i.get("split")})
        params = sorted({(s.get("model") or {}).get("num_params") for s in sums} - {None})
        rows = [("dataset", f"`{self._values('data.name')}`" + (f", input {', '.join(shapes)}" if shapes else "")
                 + (f"; data.fraction={self._values('data.fraction')}" if self._values("data.fraction") != "1"
                    else "")),
                ("split sizes", "; ".join(sizes) or "not recorded"),
                ("split", " / ".join(splits) or "not recorded"),
                ("model", f"`{self._values('model.name')}`"
                 + (f", {', '.join(f'{p:,}' for p in params)} parameters" if params else "")),
                ("loss", self._values("loss.name")), ("optimizer", self._values("optim.name")),
                ("schedule", self._schedule_text()), ("lr", self._values("lr")), ("reg", self._values("reg")),
                ("batch size", self._values("batch_size")), ("epochs", self._values("epochs")),
                ("augmentation", self._values("augment.names").replace("[]", "none")),
                ("early stopping (patience)", self._values("patience")),
                ("seeds", self._seeds_text()), ("runs", self._runs_text()),
                ("machine", self._machine_text(sums)), ("wall time", self._time_text(sums))]
        return "## Protocol\n\n" + md_table(["", "value"], rows)

    def results_section(self, groups):
        parts = ["## Results\n"]
        if not len(groups):
            parts.append("No run completed: there is nothing to summarise (see the runs at the end).\n")
            return "\n".join(parts)
        parts.append(f"Test accuracy of the model picked by validation accuracy (the `test_acc` of each run's "
                     f"summary), over the seeds of each configuration: mean ± sample standard deviation, and the "
                     f"{CONFIDENCE:.0%} Student-t confidence interval of the mean (none with one seed). "
                     f"[table.csv](table.csv) has every column at full precision."
                     + (" The peak column is the highest test accuracy any epoch reached: that epoch is picked on "
                        "the test set itself, so it is optimistic, and shown only because single-run reports often "
                        "quote it." if self.spec.peak else "") + "\n")
        if self.name == "reg_sweep" and {"reg", "loss.name"} <= set(self.group_keys):
            parts.append(self.reg_table(groups))
        else:
            parts.append(self.config_table(groups))
        if self.spec.compare:
            parts.append(self.difference_section())
        if self.name == "reg_sweep":
            parts.append(self.reg_figure(groups))
        return "\n".join(parts)

    def config_table(self, groups):
        headers = [*(_short(k) for k in self.label_keys), "seeds", "test acc (%)", f"{CONFIDENCE:.0%} CI (%)",
                   "min – max (%)", "best epoch (per seed)"]
        if self.spec.peak:
            headers.append("peak test acc, any epoch (%)")
        headers += ["train time / run", "s / epoch"]
        if self.spec.published:
            headers.append("seed published (%)")
        rows = []
        for _, g in self._ordered(groups).iterrows():
            row = [*(_fmt_value(g[k]) for k in self.label_keys), _seeds_cell(g), _pm(g),
                   _ci(g["test_acc_ci_low"], g["test_acc_ci_high"]),
                   f"{pct(g['test_acc_min'])} – {pct(g['test_acc_max'])}", g["best_epochs"] or "n/a"]
            if self.spec.peak:
                row.append(pct(g["peak_test_acc_mean"]))
            row += [fmt_seconds(g["train_seconds_mean"]), f"{g['seconds_per_epoch']:.2f}"]
            if self.spec.published:
                row.append(pct(g.get("seed_published", math.nan)))
            rows.append(row)
        return md_table(headers, rows)

    def reg_table(self, groups):
        """Rows reg (plus any other varying key), columns loss; the best mean of each row in bold."""
        losses = sorted(groups["loss.name"].unique())
        row_keys = [k for k in self.group_keys if k != "loss.name"]
        headers = [*(_short(k) for k in row_keys), *(_loss_label(l) for l in losses)]
        rows = []
        ordered = groups.sort_values(row_keys, kind="stable")
        for key, part in ordered.groupby(row_keys, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            cells = {r["loss.name"]: r for _, r in part.iterrows()}
            means = [cells[l]["test_acc_mean"] for l in losses if l in cells]
            best = max(means) if means else math.nan
            row = [_fmt_value(v) for v in key]
            for l in losses:
                if l not in cells:
                    row.append("–")
                    continue
                text = _pm(cells[l])
                row.append(f"**{text}**" if cells[l]["test_acc_mean"] == best else text)
            rows.append(row)
        return (md_table(headers, rows) + "\nCells: test accuracy (%) as mean ± std over seeds (the mean alone with "
                "one seed); **bold**: the best loss of the row.\n")

    def difference_section(self):
        key, a, b = self.spec.compare
        parts = [f"### {_fmt_value(a)} − {_fmt_value(b)}, paired by seed\n"]
        rows, csv_rows = [], []
        for protocol, diff, pairs in self.differences():
            desc = ", ".join(f"{_short(k)}={_fmt_value(v)}" for k, v in protocol.items())
            for seed, va, vb in pairs:
                rows.append([*([desc] if protocol else []), str(seed), pct(va), pct(vb), pct_points(va - vb)])
            rows.append([*([desc] if protocol else []), "**mean**", "", "",
                         f"**{pct_points(diff['mean'])}** (95% CI {_ci_points(diff)}, p = {_p(diff['p_value'])})"])
            csv_rows.append({**protocol, "a": a, "b": b, "n_pairs": diff["n"],
                             "seeds": " ".join(map(str, diff["keys"])), "diff_mean": diff["mean"],
                             "diff_std": diff["std"], "diff_ci_low": diff["ci_low"], "diff_ci_high": diff["ci_high"],
                             "t": diff["t"], "p_value": diff["p_value"],
                             "seed_published_diff": self.spec.published.get(a, math.nan)
                             - self.spec.published.get(b, math.nan)})
        headers = [*(["protocol"] if rows and len(rows[0]) == 5 else []), "seed", f"{_fmt_value(a)} (%)",
                   f"{_fmt_value(b)} (%)", "difference (points)"]
        if not csv_rows:
            return "\n".join(parts + [f"No seed has a completed run of both {a} and {b}.\n"])
        self._write_csv("difference.csv", pd.DataFrame(csv_rows))
        parts.append(md_table(headers, rows))
        parts.append(f"Differences are in percentage points; the interval is the Student-t interval of the mean "
                     f"paired difference and p the two-sided paired t-test ([difference.csv](difference.csv)).\n")
        return "\n".join(parts)

    def differences(self):
        """[(protocol dict, stats.paired_difference result, [(seed, a, b), ...])] per protocol."""
        key, a, b = self.spec.compare
        if key not in self.done.columns:
            return []
        others = [k for k in self.group_keys if k != key]
        out = []
        for protocol, part in self._groups_of(self.done, others):
            by_arm = {arm: dict(zip(_ints(rows[SEED_KEY]), rows["test_acc"]))
                      for arm, rows in part.groupby(key) if arm in (a, b)}
            va, vb = by_arm.get(a, {}), by_arm.get(b, {})
            diff = stats.paired_difference(va, vb, CONFIDENCE)
            if diff["n"]:
                pairs = [(s, va[s], vb[s]) for s in diff["keys"]]
                out.append((dict(zip(others, protocol)), diff, pairs))
        return out

    def seed_section(self, groups):
        if self.name not in SPECS:
            return ""
        parts = ["## Compared with the seed\n", f"**Seed published.** {self.spec.published_text}\n"]
        if self.spec.dataset == "gtsrb":
            parts.append(GTSRB_SPLIT_NOTE + "\n")
        if self.spec.compare and self.spec.published and len(groups):
            key, a, b = self.spec.compare
            rows = []
            for arm in (a, b):
                part = groups[groups[key] == arm] if key in groups else groups.iloc[0:0]
                ours = "; ".join(f"{_pm(g)} (n={g['n_runs']})" for _, g in part.iterrows()) or "no run"
                rows.append([_fmt_value(arm), ours, pct(self.spec.published[arm])])
            ours_diff = "; ".join(f"{pct_points(d['mean'])} (95% CI {_ci_points(d)})" for _, d, _ in
                                  self.differences()) or "n/a"
            rows.append([f"{_fmt_value(a)} − {_fmt_value(b)} (points)", ours_diff,
                         pct_points(self.spec.published[a] - self.spec.published[b])])
            parts.append(md_table(["", "ours (%)", "seed (%)"], rows))
        verdict = self.verdict(groups)
        if verdict:
            parts.append(f"**Verdict.** {verdict}\n")
        return "\n".join(parts)

    def verdict(self, groups):
        """Sentences, computed from the numbers, saying whether the seed's conclusion holds here."""
        if not len(groups):
            return "No run completed, so there is no answer yet."
        if self.spec.compare:
            return self._compare_verdict()
        if self.name == "reg_sweep" and {"reg", "loss.name"} <= set(groups.columns):
            return self._reg_verdict(groups)
        best = self._ordered(groups, by_accuracy=True).iloc[0]
        text = f"Best: {self._label(best)} with {_pm(best)}% test accuracy"
        if len(groups) > 1:
            worst = self._ordered(groups, by_accuracy=True).iloc[-1]
            fastest = groups.sort_values(["seconds_per_epoch"], kind="stable").iloc[0]
            text += (f"; worst: {self._label(worst)} with {_pm(worst)}%; fastest per epoch: "
                     f"{self._label(fastest)} ({fastest['seconds_per_epoch']:.2f} s)")
        return text + "."

    def _compare_verdict(self):
        key, a, b = self.spec.compare
        seed_gap = self.spec.published.get(a, math.nan) - self.spec.published.get(b, math.nan)
        diffs = self.differences()
        if not diffs:
            return f"No seed has completed runs of both {a} and {b}: no paired comparison yet."
        sentences = []
        for protocol, d, _ in diffs:
            where = (" (" + ", ".join(f"{_short(k)}={_fmt_value(v)}" for k, v in protocol.items()) + ")"
                     if protocol else "")
            gap = f"{pct_points(d['mean'])} points"
            seed_side = f"the seed found {a} ahead by {abs(seed_gap) * 100:.2f} points" if seed_gap > 0 else \
                f"the seed found {b} ahead by {abs(seed_gap) * 100:.2f} points"
            if d["n"] < 2:
                agree = "agrees with" if np.sign(d["mean"]) == np.sign(seed_gap) else "is opposite to"
                sentences.append(f"With one seed{where}, {a} − {b} = {gap}; its direction {agree} the seed's, but "
                                 f"one pair gives no confidence interval, so this is no evidence either way.")
            elif stats.excludes_zero(d):
                winner, loser = (a, b) if d["mean"] > 0 else (b, a)
                agree = "Agrees with the seed" if np.sign(d["mean"]) == np.sign(seed_gap) else \
                    "Differs from the seed"
                sentences.append(f"{agree}{where}: {winner} beats {loser} by {abs(d['mean']) * 100:.2f} points "
                                 f"(95% CI {_ci_points(d)} over {d['n']} paired seeds, which excludes 0); "
                                 f"{seed_side}.")
            else:
                inside = d["ci_low"] <= seed_gap <= d["ci_high"]
                sentences.append(f"Not confirmed{where}: {a} − {b} = {gap} with a 95% CI of {_ci_points(d)} over "
                                 f"{d['n']} paired seeds, which includes 0, so our runs cannot tell {a} and {b} "
                                 f"apart; {seed_side}, a gap "
                                 f"{'inside' if inside else 'outside'} our interval.")
        return " ".join(sentences)

    def _reg_verdict(self, groups):
        others = [k for k in self.group_keys if k not in ("loss.name", "reg")]
        if others or set(groups["loss.name"]) != {"svm_l1", "svm_l2"}:
            best = self._ordered(groups, by_accuracy=True).iloc[0]
            return f"Best: {self._label(best)} with {_pm(best)}% test accuracy."
        wide = groups.pivot(index="reg", columns="loss.name", values="test_acc_mean").dropna()
        k, m = int((wide["svm_l2"] >= wide["svm_l1"]).sum()), len(wide)
        holds = "holds" if k > m / 2 else "does not hold"
        lo, hi = groups["test_acc_mean"].min(), groups["test_acc_mean"].max()
        best = {l: groups[groups["loss.name"] == l].sort_values("test_acc_mean", ascending=False,
                                                                  kind="stable").iloc[0]
                for l in ("svm_l1", "svm_l2")}
        return (f"The seed's conclusion that L2-SVM is at least as good as L1-SVM at most values of reg {holds} "
                f"here: L2-SVM ≥ L1-SVM (mean over seeds) at {k} of {m} reg values. Our accuracies range from "
                f"{pct(lo)}% to {pct(hi)}% (seed: 93.27% to 98.08%); the best reg is "
                f"{_fmt_value(best['svm_l1']['reg'])} for L1-SVM ({pct(best['svm_l1']['test_acc_mean'])}%) and "
                f"{_fmt_value(best['svm_l2']['reg'])} for L2-SVM ({pct(best['svm_l2']['test_acc_mean'])}%).")

    # ---- figures

    def figures_section(self):
        if not len(self.done):
            return ""
        path = self.curves_figure()
        n = sorted(set(int(x) for x in self.group_table()["n_runs"]))
        band = ("the band spans the lowest to the highest value over the seeds (min–max)" if max(n) > 1
                else "one seed per configuration, so no band")
        if max(n) > 1 and not self._bands():
            band = (f"bands (the seeds' min–max) are left out because a panel has more than {MAX_BANDS} "
                    f"configurations; [runs.csv](runs.csv) has every run")
        drops = (" Dotted vertical lines mark the learning-rate drops (the dynamic schedule restores the best "
                 "model there)." if self._has_drops() else "")
        return (f"## Curves\n\n![Test accuracy and training loss per epoch]({path.name})\n\n"
                f"Per epoch, for each configuration: test accuracy (top) and mean training loss (bottom"
                f"{', log scale' if self._log_loss() else ''}) "
                f"of the completed runs. The line is the mean over seeds; {band}.{drops}\n")

    def curves_figure(self):
        panel_key = self.spec.panel if self.spec.panel in self.group_keys else None
        panels = sorted(self.done[panel_key].unique(), key=runs_mod._sort_key) if panel_key else [None]
        hue_keys = [k for k in self.label_keys if k != panel_key]
        fig = Figure(figsize=(5.2 * len(panels) + 0.6, 7.0))
        axes = fig.subplots(2, len(panels), squeeze=False, sharex="col")
        numeric_hue = len(hue_keys) == 1 and pd.api.types.is_numeric_dtype(self.done[hue_keys[0]]) \
            and self.done[hue_keys[0]].nunique() > 6
        groups = list(self._groups_of(self.done))
        hue_values = sorted({tuple(dict(zip(self.group_keys, k))[h] for h in hue_keys) for k, _ in groups},
                            key=lambda t: tuple(runs_mod._sort_key(v) for v in t))
        colour = _colours(hue_values, numeric_hue)
        for col, pval in enumerate(panels):
            top, bottom = axes[0, col], axes[1, col]
            for key, part in groups:
                cfg = dict(zip(self.group_keys, key))
                if panel_key and cfg[panel_key] != pval:
                    continue
                hue = tuple(cfg[h] for h in hue_keys)
                c = colour[hue]
                curves = self._curves(part["run_dir"])
                label = (", ".join(_fmt_value(v) for v in hue) or self.name) + f" (n={len(part)})"
                for ax, metric, scale in ((top, "test_acc", 100.0), (bottom, "train_loss", 1.0)):
                    m = curves[metric]
                    ax.plot(m.index, m["mean"] * scale, color=c, lw=1.4, label=label)
                    if len(part) > 1 and self._bands():
                        ax.fill_between(m.index, m["min"] * scale, m["max"] * scale, color=c, alpha=0.18, lw=0)
                    for epoch in self._drops(part["run_dir"].iloc[0], cfg):
                        ax.axvline(epoch - 0.5, color=c, ls=":", lw=1.0)
            if panel_key:
                top.set_title(f"{_short(panel_key)} = {_fmt_value(pval)}")
            bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
            top.set_ylabel("test accuracy (%)")
            bottom.set_ylabel("training loss")
            bottom.set_xlabel("epoch")
            if self._log_loss():
                bottom.set_yscale("log")
            top.legend(loc="best", title=", ".join(_short(h) for h in hue_keys) or None,
                       ncol=2 if len(hue_values) > 6 else 1)
        fig.suptitle(f"{self.name}\nline: mean over seeds" + ("; band: min–max over seeds" if self._bands() and
                                                               len(self.done) > len(groups) else "")
                     + ("; dotted: lr drop" if self._has_drops() else ""), fontsize=10)
        fig.tight_layout()
        return self._save_figure(fig, "curves.png")

    def reg_figure(self, groups):
        """Test accuracy against reg, one line per loss, error bars = 95% CI over seeds."""
        if not {"reg", "loss.name"} <= set(groups.columns):
            return ""
        fig = Figure(figsize=(7.0, 4.2))
        ax = fig.subplots()
        positive = groups.loc[groups["reg"] > 0, "reg"]
        linthresh = float(positive.min()) if len(positive) else 1e-9
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.6)
        others = [k for k in self.group_keys if k not in ("reg", "loss.name")]
        lines = list(self._groups_of(groups, ["loss.name", *others]))
        colour = _colours([k for k, _ in lines], False)
        for key, part in lines:
            part = part.sort_values("reg", kind="stable")
            err = (part["test_acc_ci_high"] - part["test_acc_mean"]).fillna(0.0) * 100
            label = ", ".join(_loss_label(v) if i == 0 else f"{_short(others[i - 1])}={_fmt_value(v)}"
                              for i, v in enumerate(key))
            ax.errorbar(part["reg"], part["test_acc_mean"] * 100, yerr=err, color=colour[key], marker="o", ms=4,
                        capsize=3, lw=1.3, label=label)
        if self.dataset == self.spec.dataset:
            ax.axhspan(93.27, 98.08, color="0.85", alpha=0.5, lw=0, label="seed's published range")
        ax.set_xlabel(f"reg (L2 penalty; symmetric log axis, linear below {linthresh:g} so that 0 shows)")
        ax.set_ylabel("test accuracy (%)")
        # a t interval from few seeds can reach past 100%: keep the axis on possible accuracies
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, -0.5), min(high, 100.5))
        ax.set_title("reg_sweep: test accuracy vs reg (mean over seeds, bars = 95% CI)")
        ax.legend(loc="best")
        fig.tight_layout()
        path = self._save_figure(fig, "accuracy_vs_reg.png")
        ns = sorted(set(int(n) for n in groups["n_runs"]))
        bars = ("error bars: the 95% Student-t interval of the mean over seeds" if max(ns) > 1 else
                "one seed per point, so no error bars")
        return (f"![Test accuracy against reg]({path.name})\n\nMean test accuracy per loss against reg; {bars}. "
                f"The x axis is logarithmic above {linthresh:g} and linear below it, so reg = 0 has a place.\n")

    # ---- confusion matrix

    def confusion_section(self):
        if not self.want_confusion:
            return ""
        if not len(self.done):
            return ""
        best = self.done.sort_values(["val_acc"], ascending=False, kind="stable").iloc[0]
        run_dir = best["run_dir"]
        head = (f"## Confusion matrix\n\nThe best run by validation accuracy, `{run_dir}` "
                f"({self._label(best)}, seed {_fmt_value(best.get(SEED_KEY))}), on the test set.\n")
        try:
            matrix, source = confusion_matrix(self.root / run_dir)
        except ReportError as e:
            return head + f"\nSkipped: {e}\n"
        names = class_names(self.summaries.get(run_dir) or _read_summary(self.root / run_dir), len(matrix))
        acc = np.trace(matrix) / matrix.sum()
        note = ""
        if best["test_acc"] is not None and abs(acc - float(best["test_acc"])) > 1e-9:
            note = (f" Its accuracy, {pct(acc)}%, differs from the run's recorded {pct(best['test_acc'])}%: the "
                    f"data or code changed since the run.")
        frame = pd.DataFrame(matrix, index=pd.Index(range(len(matrix)), name="true/predicted"),
                             columns=range(len(matrix)))
        self._write_text("confusion_matrix.csv", frame.to_csv(lineterminator="\n"))
        fig_path = self.confusion_figure(matrix, names, run_dir)
        rows = [[_class_label(t, names[t]), _class_label(p, names[p]), str(int(matrix[t, p])),
                 pct(matrix[t, p] / max(matrix[t].sum(), 1))] for t, p in _top_confusions(matrix, 10)]
        table = (md_table(["true class", "predicted as", "images", "share of the class (%)"], rows)
                 if rows else "No test image is misclassified.\n")
        return (head + f"\nComputed from {source}; {int(matrix.sum())} test images, accuracy {pct(acc)}%.{note} "
                f"Counts in [confusion_matrix.csv](confusion_matrix.csv) (rows: true class, columns: predicted).\n\n"
                f"![Confusion matrix]({fig_path.name})\n\nMost frequent confusions:\n\n{table}")

    def confusion_figure(self, matrix, names, run_dir):
        title = f"{self.name}: confusion matrix of the best run on the test set\n{run_dir}"
        return self._save_figure(confusion_figure(matrix, names, title), "confusion.png")

    # ---- runs

    def runs_section(self):
        parts = ["## Runs\n"]
        sources = {}
        for d in self.all_runs["run_dir"]:
            parent = Path(d).parent.as_posix()
            sources[parent] = sources.get(parent, 0) + 1
        n = len(self.all_runs)
        parts.append(f"{n} run folder{'s' if n > 1 else ''} of experiment `{self.name}`, from "
                     + ", ".join(f"`{p}` ({n})" for p, n in sorted(sources.items(), key=lambda i:
                                                                     runs_mod.natural_key(i[0])))
                     + ". One row each in [runs.csv](runs.csv).\n")
        bad = self.runs[self.runs["status"] != "completed"]
        if len(bad):
            parts.append("Runs that did not complete (not in the statistics above):\n")
            parts.append(md_table(["run", "status", "error"], [[f"`{r['run_dir']}`", r["status"],
                                                                _clip(r["error"] or "", 160)]
                                                               for _, r in bad.iterrows()]))
        else:
            parts.append("Every run completed.\n")
        if len(self.superseded):
            parts.append("Superseded by a later completed run of the same configuration and seed (a resumed sweep):\n")
            parts.append(md_table(["run", "status"], [[f"`{r['run_dir']}`", r["status"]]
                                                      for _, r in self.superseded.iterrows()]))
        return "\n".join(parts)

    # ---- helpers

    def _label_keys(self, primary):
        """Keys worth naming in labels: primary keys, then the other varying keys, minus the options of
        a group whose choice varies when the choice determines them (``optim.momentum`` of each
        ``optim.name``, ``schedule.factor`` of ``dynamic``)."""
        keys = []
        for k in self.group_keys:
            choice = k.rsplit(".", 1)[0] + ".name" if "." in k else None
            if k not in primary and choice in self.group_keys and choice != k:
                per_choice = self.runs.groupby(self.runs[choice].map(str))[k]
                if all(part.map(runs_mod._value_key).nunique(dropna=False) <= 1 for _, part in per_choice):
                    continue
            keys.append(k)
        return keys

    def _label(self, row):
        return ", ".join(f"{_short(k)}={_fmt_value(row[k])}" for k in self.label_keys) or self.name

    def _groups_of(self, table, keys=None):
        """[(key tuple, rows)] grouped by ``keys`` (default: the configuration keys), in sorted key order."""
        keys = self.group_keys if keys is None else keys
        if not keys:
            return [((), table)] if len(table) else []
        ident = _row_keys(table, keys)
        order = sorted(dict.fromkeys(ident), key=lambda t: tuple(runs_mod._sort_key(v) for v in t))
        return [(key, table[[k == key for k in ident]]) for key in order]

    def _ordered(self, groups, by_accuracy=False):
        if by_accuracy:
            return groups.sort_values("test_acc_mean", ascending=False, kind="stable")
        if not self.group_keys:
            return groups
        keys = _row_keys(groups, self.group_keys)
        order = sorted(range(len(groups)), key=lambda i: tuple(runs_mod._sort_key(v) for v in keys[i]))
        return groups.iloc[order]

    def _values(self, key):
        if key not in self.runs.columns:
            return "n/a"
        values = sorted({runs_mod._value_key(v) for v in self.runs[key]}, key=runs_mod._sort_key)
        text = [_fmt_value(v) for v in values]
        return text[0] if len(text) == 1 else "varies: " + ", ".join(text)

    def _schedule_text(self):
        parts = []
        for name in sorted(set(self.runs.get("schedule.name", pd.Series(dtype=object)).dropna())):
            rows = self.runs[self.runs["schedule.name"] == name]
            opts = [c for c in self.runs.columns if c.startswith("schedule.") and c != "schedule.name"
                    and rows[c].notna().any()]
            detail = ", ".join(f"{c.split('.', 1)[1]}={_values_of(rows[c])}" for c in opts)
            parts.append(f"{name}" + (f" ({detail})" if detail else ""))
        return "; ".join(parts) or "n/a"

    def _seeds_text(self):
        if SEED_KEY not in self.runs.columns:
            return "n/a"
        seeds = sorted(set(_ints(self.runs[SEED_KEY])))
        per = sorted({len(p) for _, p in self._groups_of(self.runs)})
        count = str(per[0]) if len(per) == 1 else f"{per[0]} to {per[-1]}"
        configs = len(self._groups_of(self.runs))
        return (", ".join(map(str, seeds)) + f"; {count} run{'s' if per[-1] > 1 else ''} per configuration, "
                f"{configs} configuration{'s' if configs > 1 else ''}")

    def _runs_text(self):
        counts = self.runs["status"].value_counts()
        text = f"{len(self.runs)}: " + ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index))
        if len(self.superseded):
            text += f"; {len(self.superseded)} superseded repeats not counted"
        return text

    @staticmethod
    def _machine_text(sums):
        machines = sorted({_describe_machine(s.get("machine")) for s in sums if s.get("machine")})
        threads = sorted({s.get("threads") for s in sums} - {None})
        blas = sorted({f"{b.get('library')} {b.get('num_threads')} thread(s)" for s in sums
                       for b in (s.get("blas") or [])})
        text = "; ".join(machines) if machines else "not recorded in the run folders"
        if threads:
            text += f"; {', '.join(map(str, threads))} BLAS thread(s) per run"
        if blas:
            text += f" ({', '.join(blas)})"
        return text

    @staticmethod
    def _time_text(sums):
        wall = [s["wall_seconds"] for s in sums if s.get("wall_seconds") is not None]
        if not wall:
            return "not recorded"
        return (f"{fmt_seconds(sum(wall))} in total over {len(wall)} run{'s' if len(wall) > 1 else ''} (sum of "
                f"each run's wall time, data "
                f"loading included; parallel runs overlap); {fmt_seconds(min(wall))} to {fmt_seconds(max(wall))} "
                f"per run")

    def _metrics_of(self, run_dir):
        if run_dir not in self._metrics:
            path = self.root / run_dir / METRICS
            self._metrics[run_dir] = (pd.read_csv(path) if path.exists() and path.stat().st_size
                                      else pd.DataFrame(columns=["epoch", "lr", "train_loss", "test_acc"]))
        return self._metrics[run_dir]

    def _curves(self, run_dirs):
        out = {}
        for metric in ("test_acc", "train_loss"):
            frame = pd.concat([self._metrics_of(d).set_index("epoch")[metric].rename(i)
                               for i, d in enumerate(run_dirs)], axis=1)
            out[metric] = pd.DataFrame({"mean": frame.mean(axis=1), "min": frame.min(axis=1),
                                        "max": frame.max(axis=1)}).sort_index()
        return out

    def _peak(self, run_dir):
        m = self._metrics_of(run_dir)
        if not len(m) or m["test_acc"].isna().all():
            return math.nan, math.nan
        i = m["test_acc"].idxmax()
        return float(m.loc[i, "test_acc"]), int(m.loc[i, "epoch"])

    def _drops(self, run_dir, cfg):
        """Epochs (1-based) whose lr is lower than the previous epoch's, for step-like schedules."""
        schedule = cfg.get("schedule.name") or _single(self.runs, "schedule.name")
        if schedule not in ("dynamic", "step"):
            return []
        m = self._metrics_of(run_dir)
        lr, epochs = m["lr"].to_numpy(dtype=float), m["epoch"].to_numpy()
        return [int(epochs[i]) for i in range(1, len(lr)) if lr[i] < lr[i - 1]]

    def _has_drops(self):
        return any(self._drops(part["run_dir"].iloc[0], dict(zip(self.group_keys, key)))
                   for key, part in self._groups_of(self.done))

    def _log_loss(self):
        """A log axis for the training loss when it is positive and spans more than a decade."""
        lo = [self._metrics_of(d)["train_loss"].min() for d in self.done["run_dir"]]
        hi = [self._metrics_of(d)["train_loss"].max() for d in self.done["run_dir"]]
        lo, hi = [v for v in lo if pd.notna(v)], [v for v in hi if pd.notna(v)]
        return bool(lo and min(lo) > 0 and max(hi) > 10 * min(lo))

    def _bands(self):
        """Seed bands are drawn when no panel holds more than MAX_BANDS configurations."""
        panel_key = self.spec.panel if self.spec.panel in self.group_keys else None
        groups = self._groups_of(self.done)
        if panel_key is None:
            return len(groups) <= MAX_BANDS
        per_panel = pd.Series([dict(zip(self.group_keys, k))[panel_key] for k, _ in groups]).map(str)
        return bool(per_panel.value_counts().max() <= MAX_BANDS)

    def _save_figure(self, fig, name):
        path = save_figure(fig, self.out / name)
        self.written.append(path)
        return path

    def _write_text(self, name, text):
        atomic_write_text(self.out / name, text)
        self.written.append(self.out / name)

    def _write_csv(self, name, frame):
        self._write_text(name, runs_mod.to_csv(frame))


# --------------------------------------------------------------------------- confusion matrix

def save_figure(fig, path):
    """Write ``fig`` as a PNG without software version or date (identical bytes when regenerated),
    through a temporary file and a rename; returns ``path``."""
    path = Path(path)
    # Agg explicitly, no pyplot: headless, and no figure outlives its report
    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", metadata=PNG_METADATA)
    return path


def confusion_figure(matrix, names, title):
    """The confusion matrix as a figure: shares of each true class (rows) on a log colour scale,
    class names on both axes, counts written in the cells when there are at most 15 classes."""
    k = len(matrix)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(5.0, 0.28 * k + 3.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    positive = share[share > 0]
    # the floor sits below the smallest share, so a single error still shows as a tint
    norm = mcolors.LogNorm(vmin=max(float(positive.min()) / 3, 1e-4) if len(positive) else 1e-4, vmax=1.0)
    image = ax.imshow(np.ma.masked_equal(share, 0), cmap="Blues", norm=norm, interpolation="nearest")
    ax.grid(False)
    labels = [_class_label(i, n, 28) for i, n in enumerate(names)]
    small = 6 if k > 20 else 8
    ax.set_xticks(range(k), labels, rotation=90, fontsize=small)
    ax.set_yticks(range(k), labels, fontsize=small)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 15:
        for t in range(k):
            for p in range(k):
                if matrix[t, p]:
                    ax.text(p, t, str(int(matrix[t, p])), ha="center", va="center", fontsize=7,
                            color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02,
                 label="share of the true class (log scale; white = 0)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def confusion_matrix(run_dir):
    """(K x K int64 counts, rows true / columns predicted, on the run's test set; what it came from).

    Uses the run's ``confusion.csv`` if the trainer wrote one; else rebuilds the model from
    ``.hydra/config.yaml`` and ``checkpoint.npz`` the way the trainer does, loads the test data
    with the run's data config and predicts. Raises :class:`ReportError` saying what is missing.
    """
    run_dir = Path(run_dir)
    saved = run_dir / RUN_CONFUSION
    if saved.exists():
        return pd.read_csv(saved, index_col=0).to_numpy(dtype=np.int64), f"the run's `{RUN_CONFUSION}`"
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.exists():
        raise ReportError(f"the run folder has no {CHECKPOINT} (checkpoints are not committed); regenerate the "
                          f"report where the run's checkpoint is")
    # imported here: only this step needs the engine, Hydra's config objects and the data loaders
    from omegaconf import OmegaConf

    from numexp import config, data
    from numexp.predict import RunError, batch_scores, build_checkpoint_model

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    try:
        ds = data.load(cfg.data.name, **config.options(cfg.data))
    except data.DataError as e:
        raise ReportError(f"the test data could not be loaded ({e})") from None
    try:
        model = build_checkpoint_model(cfg, checkpoint, ds.in_shape, ds.num_classes)
    except RunError as e:
        raise ReportError(str(e)) from None
    # one BLAS thread: the same sums in the same order, so the same predictions every time
    scores = batch_scores(model, ds.x_test, int(cfg.get("eval_batch_size", 1000)), threads=1)
    pred = scores.argmax(axis=1) if len(scores) else np.zeros(0, dtype=np.int64)
    k = ds.num_classes
    matrix = np.bincount(ds.y_test * k + pred, minlength=k * k).reshape(k, k).astype(np.int64)
    return matrix, f"the run's `{CHECKPOINT}` and the `{cfg.data.name}` test set"


def class_names(summary, k):
    """The run's class names (summary.json data.class_names, else the list shipped for its data set), else
    indices: :func:`numexp.predict.class_names`."""
    from numexp.predict import class_names as run_class_names

    return run_class_names(summary, k)


def _top_confusions(matrix, n):
    off = [(int(matrix[t, p]), t, p) for t in range(len(matrix)) for p in range(len(matrix))
           if t != p and matrix[t, p]]
    off.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(t, p) for _, t, p in off[:n]]


# --------------------------------------------------------------------------- all reports

def write_reports(names, paths=(runs_mod.DEFAULT_ROOT,), out=REPORTS_DIR, confusion=True, index=False,
                  keep_runs=True):
    """Gather the runs once and write the reports of ``names`` (all found experiments if None).

    With ``keep_runs`` each report is built from copies of its runs' small files
    (:func:`archive_runs`), which then travel with it.

    Returns:
        {name: [written paths]}. Raises :class:`ReportError` when a named experiment has no runs.
    """
    table = runs_mod.gather(paths)
    found = sorted(set(table["experiment"].dropna()))
    if names is None:
        names = found
        if not names:
            raise ReportError(f"no runs of any experiment under {', '.join(map(str, paths))} "
                              f"(runs started with +experiment=NAME)")
    written, reports = {}, {}
    for name in names:
        runs = experiment_runs(table, name)
        if not len(runs):
            raise ReportError(f"no runs of experiment {name} under {', '.join(map(str, paths))}; experiments "
                              f"found: {', '.join(found) or 'none'}")
        folder = Path(out) / name
        if keep_runs:
            runs = archive_runs(runs, folder / RUNS_SUBDIR)
        reports[name] = Report(name, runs, folder, confusion=confusion, root=folder if keep_runs else ".")
        written[name] = reports[name].write()
    if index:
        written["index"] = [write_index(reports, out)]
    return written


def archive_runs(runs, dest):
    """Copy the :data:`ARCHIVED` files of each run in ``runs`` to ``dest/<sweep folder>/<run folder>/``,
    replacing what ``dest`` held, and return the runs table read back from the copies, with ``run_dir``
    relative to the report folder (``runs/<sweep>/<run>``): the report reads and names its copies.

    The runs may already live in ``dest`` (a report regenerated from its own copies): everything is
    copied to a fresh folder first, which then takes ``dest``'s place.
    """
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    for source in map(Path, runs["run_dir"]):
        target = staging / source.parent.name / source.name
        while target.exists():  # two sweeps of one name elsewhere: keep both
            target = target.with_name(f"{target.name}_")
        for name in ARCHIVED:
            if (source / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, target / name)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return runs_mod.gather([dest], relative_to=dest.parent)


def write_index(reports, out=REPORTS_DIR):
    """``<out>/README.md``: one line per report with its verdict."""
    rows = []
    for name in sorted(reports):
        r = reports[name]
        rows.append([f"[{name}]({name}/README.md)", r.spec.title, f"{len(r.done)} of {len(r.runs)}",
                     r.verdict(r.group_table())])
    text = ("# Experiment reports\n\nRegenerated from the run folders by `python -m numexp.report --all` (one "
            "experiment: `python -m numexp.report NAME`); each report states its protocol and compares with the "
            "seed's published numbers.\n\n"
            + (f"How the runs were made (protocol, commands): [{PROTOCOL}]({PROTOCOL}).\n\n"
               if (Path(out) / PROTOCOL).exists() else "")
            + md_table(["report", "experiment", "completed runs", "verdict"], rows))
    path = Path(out) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def main(argv=None):
    """``python -m numexp.report``; exit code 0, 1 when an experiment has no runs, 2 for usage errors."""
    parser = argparse.ArgumentParser(
        prog="python -m numexp.report",
        description="Regenerate experiment reports (README.md, tables as CSV, figures as PNG) from the runs on disk.")
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"experiment names ({', '.join(SPECS)}, or any other +experiment=NAME)")
    parser.add_argument("--all", action="store_true",
                        help="every experiment that has runs, plus an index README.md in the output folder")
    parser.add_argument("--runs", nargs="+", default=[runs_mod.DEFAULT_ROOT], metavar="PATH",
                        help="run or sweep folders, or folders above them (default: results/)")
    parser.add_argument("--out", default=REPORTS_DIR, help="reports folder (default: experiments/)")
    parser.add_argument("--no-runs", action="store_true",
                        help=f"do not copy the runs' small files into <out>/EXPERIMENT/{RUNS_SUBDIR}/ "
                             f"(by default the report is built from those copies and keeps them)")
    parser.add_argument("--no-confusion", action="store_true",
                        help="skip the confusion matrix (it loads the test data and the best checkpoint)")
    args = parser.parse_args(argv)
    if bool(args.experiments) == args.all:
        parser.print_usage(sys.stderr)
        print("error: name one or more experiments, or give --all", file=sys.stderr)
        return 2
    try:
        written = write_reports(None if args.all else args.experiments, args.runs, args.out,
                                confusion=not args.no_confusion, index=args.all, keep_runs=not args.no_runs)
    except (ReportError, runs_mod.RunsError) as e:
        print(f"error: {e}", file=sys.stderr)
        folders = [name for name in args.experiments if Path(name).is_dir()]
        if folders:  # `numexp report results/multirun/...`: a sweep's folder where a name belongs
            print(f"{folders[0]} is a folder: the reports of the experiments (+experiment=NAME) whose runs it "
                  f"holds are `numexp report --all --runs {folders[0]}`; the table of its runs, whatever they "
                  f"are, is `numexp runs {folders[0]}`", file=sys.stderr)
        return 1
    for name, paths in written.items():
        print(f"{name}: " + ", ".join(Path(p).as_posix() for p in paths))
    return 0


# --------------------------------------------------------------------------- formatting

def md_table(headers, rows):
    """A GitHub markdown table; ``|`` inside cells is escaped."""
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pct(x, digits=2):
    """0.98184 -> '98.18'; missing -> 'n/a'."""
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def pct_points(x):
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:+.2f}"


def fmt_seconds(s):
    if s is None or not np.isfinite(s):
        return "n/a"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(round(s % 3600 / 60)):02d} min"


def _pm(g):
    if not np.isfinite(g["test_acc_std"]):
        return pct(g["test_acc_mean"])
    return f"{pct(g['test_acc_mean'])} ± {pct(g['test_acc_std'])}"


def _ci(lo, hi):
    return "n/a" if not (np.isfinite(lo) and np.isfinite(hi)) else f"{pct(lo)} – {pct(hi)}"


def _ci_points(d):
    if not (np.isfinite(d["ci_low"]) and np.isfinite(d["ci_high"])):
        return "n/a"
    return f"[{pct_points(d['ci_low'])}, {pct_points(d['ci_high'])}]"


def _p(p):
    return "n/a" if not np.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else "< 0.001")


def _seeds_cell(g):
    return f"{g['n_runs']} ({g['seeds']})" if g["seeds"] else str(g["n_runs"])


def _fmt_value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (float, np.floating)):
        return "0" if v == 0 else f"{float(v):g}"
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def _same(a, b):
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b


def _values_of(series):
    values = sorted({runs_mod._value_key(v) for v in series.dropna()}, key=runs_mod._sort_key)
    return "/".join(_fmt_value(v) for v in values)


def _short(key):
    return {"loss.name": "loss", "optim.name": "optimizer", "schedule.name": "schedule",
            "model.name": "model", "data.name": "data"}.get(key, key)


def _loss_label(name):
    return {"svm_l1": "L1-SVM", "svm_l2": "L2-SVM", "softmax": "softmax"}.get(name, str(name))


def _clip(text, n):
    text = str(text)
    return text if len(text) <= n else text[:n - 1] + "…"


def _class_label(index, name, width=None):
    """'14 Stop' (the index alone when the name is the index, as for digits)."""
    name = str(name)
    text = name if name == str(index) else f"{index} {name}"
    return _clip(text, width) if width else text


def _sizes_text(sizes):
    return " / ".join(f"{k} {v:,}" for k, v in sizes.items())


def _describe_machine(machine):
    if isinstance(machine, dict):
        return ", ".join(f"{k} {v}" for k, v in machine.items())
    return str(machine)


def _single(table, key):
    if key not in table.columns:
        return None
    values = set(table[key].dropna())
    return next(iter(values)) if len(values) == 1 else None


def _mean(values):
    values = pd.to_numeric(pd.Series(list(values)), errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def _ints(values):
    return [int(v) for v in values if pd.notna(v)]


def _row_keys(table, keys):
    return [tuple(runs_mod._value_key(v) for v in row) for row in table[keys].itertuples(index=False, name=None)] \
        if keys else [()] * len(table)


def _colours(values, numeric):
    """A fixed colour per hue value: viridis along sorted numeric values, else the tab10 cycle."""
    if numeric:
        cmap = matplotlib.colormaps["viridis"]
        return {v: cmap(i / max(len(values) - 1, 1) * 0.9) for i, v in enumerate(values)}
    cmap = matplotlib.colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(values)}


def _read_summary(run_dir):
    path = Path(run_dir) / SUMMARY
    try:
        return read_json(path) if path.exists() else {}
    except ValueError:
        return {}


if __name__ == "__main__":
    sys.exit(main())
