"""The demo page: `python demo.py [ckpt_path=PATH] [reranker=...] [server.port=7860]`.

All settings live in conf/demo.yaml; this file only hands the composed config to
`dalle_lightning.demo.page.serve`. Outputs go to logs/demo/runs/<timestamp>/.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dalle_lightning.cli import check_group_choices, check_log_dir, exit_on_user_error
from dalle_lightning.runs import register_resolvers

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    from dalle_lightning.demo.page import serve  # Lightning, Gradio: after the checks

    with exit_on_user_error():
        serve(cfg)


if __name__ == "__main__":
    register_resolvers()
    check_group_choices(sys.argv[1:], CONF_DIR)
    check_log_dir(sys.argv[1:])
    main()
