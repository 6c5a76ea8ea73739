"""FSDP2 (`torch.distributed.fsdp.fully_shard`) driven by Lightning's `ModelParallelStrategy`.

`trainer=fsdp` builds `FSDP2Strategy`: Lightning's strategy (process groups, device mesh,
distributed checkpoints) plus the sharding options, which the LightningModules apply in their
`configure_model` through `shard(...)`, torchtitan-style:

- each unit the module names (every prior `Block`, every dVAE `ResBlockGroup`) becomes its own
  FSDP2 group, with activation checkpointing first when `activation_checkpointing` is on;
- the module's fp32 islands (models/fp32.py: the prior's output heads, the dVAE's code-logit
  conv and its decoder's first conv) become groups whose parameters are all-gathered and run
  in fp32 whatever `param_dtype` the rest uses, so their logits stay fp32;
- then the root (the prior, or the dVAE), which holds what is left (embeddings, final norm).

Parameters, gradients and AdamW's moments are then DTensor shards over the data-parallel
dimension of the mesh: each rank holds 1/world_size of them. The models stay plain PyTorch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from dalle_lightning.modules.fsdp2_options import DTYPES, check_options, compute_dtype_name

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` with the FSDP2 options of conf/trainer/fsdp.yaml.

    data_parallel_size: `auto` = world size / tensor_parallel_size (devices x nodes).
    tensor_parallel_size: 1 (the models have no tensor-parallel plan; `check_trainer` refuses
        others before any work).
    reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3;
        all-gathered again in backward) or keep them until the backward (ZeRO-2-like: more
        memory, fewer all-gathers).
    activation_checkpointing: recompute each unit's activations in the backward pass.
    param_dtype: the dtype units all-gather and compute in: `auto` follows trainer.precision
        (bf16-mixed -> bf16, 16-mixed -> fp16, else fp32), or bf16 | fp16 | fp32.
    reduce_dtype: the dtype gradients are reduce-scattered in (fp32: the paper's choice).
    cpu_offload: keep the shards (and AdamW's state) in host memory between uses.
    """

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        param_dtype: str = "auto",
        reduce_dtype: str = "fp32",
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        check_options(
            dict(
                param_dtype=param_dtype,
                reduce_dtype=reduce_dtype,
                reshard_after_forward=reshard_after_forward,
                activation_checkpointing=activation_checkpointing,
                cpu_offload=cpu_offload,
                save_distributed_checkpoint=save_distributed_checkpoint,
            )
        )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        # the world size is known here: data parallel over all ranks, tensor parallel 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = (
                self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
            )
        super().setup_environment()

    def compute_dtype(self) -> torch.dtype | None:
        """What the units all-gather and compute in (None: their own fp32)."""
        name = compute_dtype_name(self.param_dtype, str(self.precision_plugin.precision))
        return None if name == "fp32" else DTYPES[name]

    def shard(
        self,
        root: nn.Module,
        units: Iterable[nn.Module],
        fp32_islands: Sequence[nn.Module] = (),
        methods: Sequence[str] = (),
    ) -> None:
        """fully_shard each unit, each fp32 island and then `root`, in place. `methods`: root
        methods other than forward that run the model (they gather the root's parameters)."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        mesh = self.device_mesh["data_parallel"]
        reduce = DTYPES[self.reduce_dtype]
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype(), reduce_dtype=reduce)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=reduce)
        offload = (
            CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
            if self.cpu_offload
            else OffloadPolicy()
        )
        common = dict(mesh=mesh, offload_policy=offload)
        reshard = self.reshard_after_forward
        units = list(units)
        if self.activation_checkpointing:
            units = [_checkpointed(unit, root, checkpoint_wrapper) for unit in units]
        for unit in units:
            fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard, **common)
        for island in fp32_islands:
            fully_shard(island, mp_policy=fp32, reshard_after_forward=reshard, **common)
        # the root's parameters are needed again first in the backward: kept gathered
        fully_shard(root, mp_policy=policy, reshard_after_forward=False, **common)
        for method in methods:
            register_fsdp_forward_method(root, method)
        local = sum(p.to_local().numel() for p in root.parameters())
        total = sum(p.numel() for p in root.parameters())
        log.info("FSDP2 rank %d holds %d of %d parameters", self.global_rank, local, total)
        log.info(
            "FSDP2: %d units + %d fp32 islands + the root sharded over %d ranks (param dtype %s, "
            "reduce dtype %s, activation checkpointing %s, reshard after forward %s, CPU "
            "offload %s)",
            len(units),
            len(fp32_islands),
            mesh.size(),
            self.compute_dtype() or torch.float32,
            reduce,
            self.activation_checkpointing,
            self.reshard_after_forward,
            self.cpu_offload,
        )


def _checkpointed(unit: nn.Module, root: nn.Module, wrap) -> nn.Module:
    """Replace `unit` inside `root` by its checkpoint wrapper (its state-dict keys unchanged)."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is unit:
                wrapped = wrap(unit, preserve_rng_state=True)
                parent.register_module(name, wrapped)
                return wrapped
    raise ValueError(f"{type(unit).__name__} is not inside {type(root).__name__}")


def sharded(module: nn.Module) -> bool:
    """Whether fully_shard has been applied to `module` (FSDP2 subclasses it in place)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
