"""summary.json records which numexp produced a run (version, git commit, dirty flag and diff), when,
and the user's tags and notes, which become columns of `numexp runs`."""
import io
import json
import shutil
import subprocess
from datetime import datetime

import pandas as pd
import pytest

from conftest import TINY
from numexp import provenance, trainer


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    if not shutil.which("git"):
        pytest.skip("no git")
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("venv/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def test_git_info_clean_dirty_untracked_and_no_repo(repo, tmp_path):
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance.git_info(repo / "pkg") == ({"commit": head, "dirty": False}, "")
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    info, diff = provenance.git_info(repo / "pkg")
    assert info == {"commit": head, "dirty": True} and "-x = 1\n+x = 2" in diff
    # an installed numexp inside some project's ignored virtualenv is not that project's code
    (repo / "venv" / "numexp").mkdir(parents=True)
    assert provenance.git_info(repo / "venv" / "numexp") == (None, "")
    (tmp_path / "plain").mkdir()
    assert provenance.git_info(tmp_path / "plain") == (None, "")


def test_summary_records_provenance_and_a_dirty_tree_diff(compose_cfg, tmp_path, monkeypatch, repo):
    (repo / "pkg" / "mod.py").write_text("x = 3\n")  # a dirty checkout standing in for numexp's own
    monkeypatch.setattr(provenance, "PACKAGE_DIR", repo / "pkg")
    summary = trainer.train(compose_cfg([*TINY, "tags=[baseline,v2]", "notes=first try"]), out_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["numexp"]["version"] == provenance.numexp_version() is not None
    assert saved["numexp"]["git"]["dirty"] is True and len(saved["numexp"]["git"]["commit"]) == 40
    assert "+x = 3" in (tmp_path / "run" / "git.diff").read_text()
    assert saved["tags"] == ["baseline", "v2"] and saved["notes"] == "first try" == summary["notes"]
    start, end = (datetime.fromisoformat(saved[k]) for k in ("start_time", "end_time"))
    assert start.tzinfo is not None and start <= end


def test_clean_tree_writes_no_diff(compose_cfg, tmp_path, monkeypatch, repo):
    monkeypatch.setattr(provenance, "PACKAGE_DIR", repo / "pkg")
    trainer.train(compose_cfg(TINY), out_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["numexp"]["git"]["dirty"] is False
    assert not (tmp_path / "run" / "git.diff").exists()


def test_tags_and_notes_are_runs_table_columns(run_cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "reg=0,1e-3", "tags=[baseline,v2]", "notes='first try'", "hydra.launcher.n_jobs=1",
                   f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("runs", str(sweep_dir), "--out", "-")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(io.StringIO(proc.stdout))
    # the same in both runs, still shown: they are the user's labels, not config noise
    assert table["tags"].map(json.loads).tolist() == [["baseline", "v2"]] * 2
    assert table["notes"].tolist() == ["first try"] * 2
