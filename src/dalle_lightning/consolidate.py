"""`python -m dalle_lightning.consolidate DIR [--out FILE]`: one checkpoint file from a
sharded one.

Under `trainer=fsdp` a checkpoint is a directory of per-rank shards (torch.distributed.checkpoint)
plus Lightning's `meta.pt`: `resume=true` continues from it as it is, while `evaluate.py`,
`DALLE.from_checkpoint` and `model.dvae_ckpt` read single files. This gathers every shard on
one process (no GPUs or process group needed; the host needs the model's full size in memory)
and writes `<DIR stem>.full.ckpt` next to the directory: the weights and every entry of
`meta.pt` (configs, tokenizer, step), without the optimizer state.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dalle_lightning.checkpoints import consolidate, is_sharded
from dalle_lightning.cli import exit_on_user_error
from dalle_lightning.config import ConfigError

log = logging.getLogger(__name__)


def default_output(path: Path) -> Path:
    return path.with_name(f"{path.stem}.full.ckpt")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m dalle_lightning.consolidate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("path", type=Path, help="a sharded checkpoint directory (*.ckpt/)")
    parser.add_argument("--out", type=Path, default=None, help="default: <stem>.full.ckpt")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if not is_sharded(args.path):
            raise ConfigError(
                "path",
                str(args.path),
                "a sharded checkpoint directory (a .metadata and a meta.pt inside), as "
                "trainer=fsdp writes under checkpoints/",
            )
        out = args.out or default_output(args.path)
        ckpt = consolidate(args.path, out)
    tensors = sum(v.numel() for v in ckpt["state_dict"].values())
    print(
        f"{out}: {len(ckpt['state_dict'])} tensors, {tensors:,} values, step "
        f"{ckpt.get('global_step')}"
    )
    if "prior_config" in ckpt:
        print(f"generate from it: python evaluate.py task=generate ckpt_path={out}")
    return out


if __name__ == "__main__":
    main()
