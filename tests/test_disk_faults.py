"""A full disk or an unwritable directory while writing: one line naming the path and the error
(exit code 5), the previous complete file kept, nothing half-written left to be read later.
Faults are injected at the write call."""

from __future__ import annotations

import errno
import json
import pathlib

import pytest
import torch

from dalle_lightning import cli
from dalle_lightning.cli import EXIT_WRITE_FAILED, exit_on_user_error
from dalle_lightning.data import token_cache
from dalle_lightning.data.token_cache import load_or_encode
from dalle_lightning.evaluation.report import write_report
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.runs import write_metrics
from tests.conftest import run_script
from tests.test_file_locks import SlowImages


def _full_disk(path, *args, **kwargs):
    pathlib.Path(path).write_bytes(b"half a fi")  # what a writer leaves when the disk fills
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_while_writing_the_token_cache_leaves_nothing_half_written(
    tmp_path, monkeypatch
):
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32))
    monkeypatch.setattr(token_cache.torch, "save", lambda obj, path: _full_disk(path))
    with pytest.raises(OSError, match="No space left"):
        load_or_encode(dvae, "sha", {"d": 1}, SlowImages(), "train", tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock"]  # no partial, no .pt
    monkeypatch.undo()
    tokens = load_or_encode(dvae, "sha", {"d": 1}, SlowImages(), "train", tmp_path)
    assert tokens["codes"].shape == (8, 8, 8)  # 8 images, 8 x 8 codes


def test_a_full_disk_while_writing_metrics_json_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_metrics(path, {"global_step": 1})
    monkeypatch.setattr(pathlib.Path, "write_text", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_metrics(path, {"global_step": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(
    ("code", "message"),
    [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied")],
)
def test_the_entry_scripts_report_a_failed_write_in_one_line(capsys, code, message):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        raise OSError(code, message, "logs/train_dalle/runs/x/checkpoints/last.ckpt")
    assert exit_info.value.code == EXIT_WRITE_FAILED
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: could not write logs/train_dalle/runs/x/checkpoints/last.ckpt")
    assert message in line and "resume=true" in line


def test_other_os_errors_keep_their_traceback():
    with pytest.raises(FileNotFoundError), exit_on_user_error():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")


def test_a_full_disk_while_writing_the_evaluation_tables_keeps_the_previous_ones(
    tmp_path, monkeypatch
):
    rows = [{"split": "test", "k": 1, "blur_radius": None, "clip_score": 0.5}]
    files = write_report(tmp_path, rows, {"seed": 1})
    before = {name: path.read_bytes() for name, path in files.items()}
    monkeypatch.setattr(pathlib.Path, "write_text", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(tmp_path, [{**rows[0], "clip_score": 0.9}], {"seed": 2})
    monkeypatch.undo()
    assert {name: path.read_bytes() for name, path in files.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values())


def test_an_unusable_log_dir_is_one_line_before_hydra_starts(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    run = run_script("train.py", "model=dvae", f"paths.log_dir={a_file}/logs")
    assert run.returncode == EXIT_WRITE_FAILED
    (line,) = run.stderr.strip().splitlines()
    assert line == (
        f"error: could not write paths.log_dir={a_file}/logs: {a_file} is not a directory. "
        "Runs write under paths.log_dir: point it at a writable directory"
    )
    # a directory this user may not write (tests run as root here: os.access is faked)
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.check_log_dir([f"paths.log_dir={tmp_path}/new/logs"])
    assert exit_info.value.code == EXIT_WRITE_FAILED
    assert f"{tmp_path} is not writable by this user" in capsys.readouterr().err
