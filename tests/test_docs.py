"""Every `python train.py ...` / `python evaluate.py ...` command in README.md,
CONTRIBUTING.md and docs/ composes against conf/ (no training): the documentation cannot
drift from the configs.

Commands are taken from code blocks (with their `\\` continuations, `&&` chains and `#`
comments) and from inline code spans. Placeholders such as `<timestamp>` become a plain
value; a sweep (`-m ... a=1,2`) is composed with the first value of each swept key."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dalle_lightning.cli import check_group_choices
from tests.conftest import CONF_DIR, ROOT, compose_config

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate"}
RUNNERS = ("python", "python3", "torchrun")
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]*(?:train|evaluate)\.py[^`\n]*)`")


def _commands(text: str) -> list[str]:
    """The shell lines of `text` that run train.py or evaluate.py. Terminal transcripts
    (`$ ...` and `error: ...` lines) show refused commands on purpose and are left out."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith(("$ ", "error:")):
                found += [part for part in line.split("&&") if _script(part)]
    found += [span for span in INLINE.findall(FENCE.sub("", text)) if _script(span)]
    return found


def _script(command: str) -> str | None:
    """train or evaluate when `command` runs that script with python (or torchrun)."""
    words = [w.rsplit("/", 1)[-1] for w in command.split("#")[0].split()]
    for i, word in enumerate(words):
        if word in SCRIPTS and any(w in RUNNERS for w in words[:i]):
            return SCRIPTS[word]
    return None


def _overrides(command: str) -> list[str]:
    """The Hydra overrides after the script name, placeholders filled, sweeps at their first
    value."""
    command = re.sub(r"<[^<>]+>", "placeholder", command)
    words = shlex.split(command, comments=True)
    start = next(i for i, w in enumerate(words) if w.rsplit("/", 1)[-1] in SCRIPTS)
    args = [w for w in words[start + 1 :] if w not in ("-m", "--multirun")]
    parser = OverridesParser.create()
    out = []
    for arg, override in zip(args, parser.parse_overrides(args), strict=True):
        if override.is_sweep_override():
            key = arg.split("=", 1)[0]
            arg = f"{key}={next(iter(override.sweep_string_iterator()))}"
        out.append(arg)
    return out


COMMANDS = [
    (path.relative_to(ROOT).as_posix(), command)
    for path in DOCS
    for command in _commands(path.read_text())
]


def test_the_docs_hold_the_commands_a_reader_needs():
    for path in DOCS:  # an unclosed code block would hide the commands after it
        fences = [line for line in path.read_text().splitlines() if line.startswith("```")]
        assert len(fences) % 2 == 0, path
    scripts = {_script(c) for _, c in COMMANDS}
    assert scripts == {"train", "evaluate"} and len(COMMANDS) > 40
    readme = [_overrides(c) for path, c in COMMANDS if path == "README.md"]
    for main_job in (["model=dvae"], ["model=dalle"]):  # the first command's two stages
        assert main_job in readme


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[f"{p}: {c[:60]}" for p, c in COMMANDS])
def test_documented_command_composes(path, command, tmp_path):
    overrides = _overrides(command)
    check_group_choices(overrides, CONF_DIR)  # exits with the same line as the real script
    cfg = compose_config(_script(command), overrides, tmp_path)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(job, resolve=True)  # every interpolation of the job resolves


def test_the_extractor_reads_continuations_chains_comments_and_placeholders():
    text = (
        "```bash\n.venv/bin/python train.py model=dvae && python train.py model=dalle \\\n"
        "    model.dvae_ckpt=logs/<run dir>/last.ckpt   # a comment\n"
        "python -m dalle_lightning.benchmark\n```\n"
        "and inline: `python evaluate.py -m seed=1,2`."
    )
    commands = _commands(text)
    assert [_script(c) for c in commands] == ["train", "train", "evaluate"]
    assert _overrides(commands[1]) == ["model=dalle", "model.dvae_ckpt=logs/placeholder/last.ckpt"]
    assert _overrides(commands[2]) == ["seed=1"]


def test_a_command_that_drifted_from_conf_fails(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):  # a key conf/ no longer has
        test_documented_command_composes("x.md", "python train.py model.betta=1", tmp_path)
    with pytest.raises(SystemExit):  # an option conf/ no longer has
        test_documented_command_composes("x.md", "python train.py dataset=imagenet", tmp_path)
