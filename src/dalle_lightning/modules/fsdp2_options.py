"""The sharding options of conf/trainer/fsdp.yaml (`trainer.strategy.*`), without Lightning.

`instantiate.check_trainer` checks them before Lightning is imported (`preflight.py`);
`fsdp2.FSDP2Strategy` checks them again for strategies built in code; the planner
(`plan.py`) reads the compute dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dalle_lightning.config import require_bool, require_choice

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# trainer.precision -> the parameter dtype FSDP2 all-gathers in, when param_dtype is auto
PRECISION_DTYPES = {
    "bf16-mixed": "bf16",
    "16-mixed": "fp16",
    "bf16-true": "bf16",
    "16-true": "fp16",
}
SWITCHES = (
    "reshard_after_forward",
    "activation_checkpointing",
    "cpu_offload",
    "save_distributed_checkpoint",
)


def check_options(options: Mapping[str, Any]) -> None:
    """The sharding options' values (`trainer.strategy.*`): checked by `check_trainer` before
    any work, and by the constructor for strategies built in code."""
    at = "trainer.strategy"
    require_choice(f"{at}.param_dtype", options.get("param_dtype", "auto"), ("auto", *DTYPES))
    require_choice(f"{at}.reduce_dtype", options.get("reduce_dtype", "fp32"), tuple(DTYPES))
    for switch in SWITCHES:
        require_bool(f"{at}.{switch}", options.get(switch, False))


def compute_dtype_name(param_dtype: str, precision: str) -> str:
    """bf16 | fp16 | fp32: what the units gather and compute in, for `param_dtype` (`auto`:
    from `precision`, trainer.precision's value); the planner uses it too."""
    return PRECISION_DTYPES.get(precision, "fp32") if param_dtype == "auto" else param_dtype
