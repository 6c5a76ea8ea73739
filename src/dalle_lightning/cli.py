"""What the entry scripts share: user errors as one line on stderr and exit code 2.

Hydra reports an unknown config option (`dataset=cocoo`) as a multi-line traceback-like
message; `check_group_choices` catches those before Hydra starts, and `exit_on_user_error`
turns a `ConfigError` raised while building the run into one line. The checks run before
Lightning is imported (~3 s on a CPU machine), so a mistyped command line fails at once.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dalle_lightning.config import ConfigError

EXIT_USER_ERROR = 2
EXIT_TRAINING_DIVERGED = 3
EXIT_PREEMPTED = 4
EXIT_WRITE_FAILED = 5
# a full disk, a quota, a read-only or unwritable directory: the run cannot save its work
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """The project's errors as one line and an exit code; everything else unchanged."""
    try:
        yield
    except ConfigError as err:
        fail(str(err))
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        where = err.filename or "a file"
        fail(
            f"could not write {where}: {err.strerror}. Everything written before is complete "
            "(files are written to a temporary name, then renamed); free space or fix the "
            "permissions, then rerun (with resume=true to continue training)",
            EXIT_WRITE_FAILED,
        )
    except BaseException as err:  # SIGTERMException is a SystemExit
        if _raised(err, "dalle_lightning.callbacks.nonfinite", "NonFiniteError"):
            fail(str(err), EXIT_TRAINING_DIVERGED)
        if _raised(err, "lightning.pytorch.utilities.exceptions", "SIGTERMException"):
            fail(
                "received SIGTERM: training stopped at a step boundary and checkpoints/last.ckpt "
                "holds it; continue with the same command and resume=true (a job SLURM "
                "requeues does so by itself)",
                EXIT_PREEMPTED,
            )
        raise


def _raised(err: BaseException, module: str, name: str) -> bool:
    """Whether `err` is `module.name`, without importing `module`: the checks before
    training run without Lightning, and an error class nothing imported was not raised."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(err, getattr(loaded, name))


def group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_log_dir(argv: list[str]) -> None:
    """Fail in one line (exit code 5) when `paths.log_dir` cannot be created or written,
    before Hydra tries to make the run directory in it (its own error is a traceback)."""
    value = "logs"  # conf/paths/default.yaml: ${paths.root_dir}/logs, root_dir "."
    for arg in argv:
        key, sep, given = arg.lstrip("+").partition("=")
        if sep and key == "paths.log_dir" and "${" not in given and "," not in given:
            value = given
    path = Path(value).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    if problem:
        fail(
            f"could not write paths.log_dir={value}: {problem}. Runs write under "
            "paths.log_dir: point it at a writable directory",
            EXIT_WRITE_FAILED,
        )


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Fail on `group=option` overrides naming an option that has no yaml file in conf/<group>."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"}
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if not sep or group not in groups or "(" in value or value in ("", "null"):
            continue
        options = group_options(conf_dir, group)
        chosen = value.strip("[]").split(",")  # a list [a,b] or a sweep a,b
        for option in (c.strip() for c in chosen):
            if option and option not in options:
                fail(str(ConfigError(group, option, "one of " + ", ".join(options))))
