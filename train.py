"""Train a stage of DALL-E: `python train.py model=dvae [key=value ...]`; sweeps with `-m`.

All settings live in conf/ (start at conf/train.yaml); this file only hands the composed
config to `dalle_lightning.train.train`. Outputs go to logs/<task_name>/runs/<timestamp>/.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dalle_lightning.cli import check_group_choices, check_log_dir, exit_on_user_error
from dalle_lightning.runs import register_resolvers

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    register_resolvers()  # a launcher's job process runs this function alone
    from dalle_lightning.preflight import check_train  # torch, after the command line's checks

    with exit_on_user_error():
        check_train(cfg)  # before Lightning is imported: its imports are most of a refusal
        from dalle_lightning.train import train

        value, _ = train(cfg)
    return value  # the optimized metric, for sweepers


if __name__ == "__main__":
    register_resolvers()  # before Hydra composes: hydra.run.dir names the run to resume
    check_group_choices(sys.argv[1:], CONF_DIR)
    check_log_dir(sys.argv[1:])
    main()
