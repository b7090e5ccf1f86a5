"""Which numexp code produced a run: its version and, for a git checkout, the commit and whether
the tree had uncommitted changes (the diff itself goes to the run's ``git.diff``)."""
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def numexp_version():
    try:
        return version("numexp")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return None


def git_info(path=None):
    """``({"commit": ..., "dirty": bool}, diff_text)`` of the git checkout holding ``path`` (default:
    numexp's own source folder). Untracked files do not count: the diff could not restore them.

    ``(None, "")`` when git is missing or ``path`` is not tracked by git: an installed numexp in a
    project's (ignored) virtualenv must not report that project's commit.
    """
    path = PACKAGE_DIR if path is None else path

    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    try:
        if not git("ls-files", "--", ".").strip():
            return None, ""
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
        diff = git("diff", "HEAD") if dirty else ""
    except (OSError, subprocess.SubprocessError):
        return None, ""
    return {"commit": commit, "dirty": dirty}, diff


def now_iso():
    """The current time, ISO 8601 with the UTC offset (comparable across machines)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
