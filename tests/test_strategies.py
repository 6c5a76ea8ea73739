"""Scale-out configs: trainer=fsdp and trainer=ddp_powersgd build what they name and refuse
what cannot run; the PowerSGD hook compresses the prior's gradients (two CPU processes, gloo).
FSDP2 runs through train.py are in test_fsdp2.py."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import OmegaConf
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook

from dalle_lightning.config import ConfigError
from dalle_lightning.instantiate import build, check_trainer
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.fsdp2 import FSDP2Strategy
from dalle_lightning.modules.losses import prior_loss
from dalle_lightning.stages import build_stage
from tests.conftest import CONF_DIR
from tests.test_dalle_train import tiny_module

PRIOR = dict(text_vocab=64, text_seq_len=8, image_vocab=32, grid_size=4, dim=32, depth=3, heads=2)


def test_fsdp_config_builds_fsdp2_with_its_options(make_cfg):
    cfg = make_cfg(["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.activation_checkpointing and strategy.reshard_after_forward
    assert (strategy.param_dtype, strategy.reduce_dtype) == ("auto", "fp32")
    assert strategy._save_distributed_checkpoint is True  # sharded checkpoints by default


def test_lightnings_fsdp1_on_cpu_is_refused_before_any_work(make_cfg):
    cfg = make_cfg(["trainer=ddp", "trainer.strategy=fsdp", "trainer.accelerator=cpu"])
    with pytest.raises(ConfigError, match="trainer.accelerator='cpu'.*FSDPStrategy runs on CUDA"):
        check_trainer(cfg)


def test_powersgd_config_hands_the_hook_and_its_settings_to_ddp(make_cfg, caplog):
    cfg = make_cfg(
        [
            "trainer=ddp_powersgd",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "trainer.strategy.ddp_comm_state.matrix_approximation_rank=4",
            "trainer.strategy.ddp_comm_state.start_powerSGD_iter=10",
        ]
    )
    with caplog.at_level(logging.WARNING):
        check_trainer(cfg)
    assert "on CUDA devices only" in caplog.text  # Lightning skips DDP hooks on CPU
    trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False)
    assert trainer.strategy._ddp_comm_hook is powerSGD_hook
    state = trainer.strategy._ddp_comm_state
    assert (state.matrix_approximation_rank, state.start_powerSGD_iter) == (4, 10)


def _batch(rows: slice):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, PRIOR["text_vocab"], (4, PRIOR["text_seq_len"]), generator=g)
    codes = torch.randint(0, PRIOR["image_vocab"], (4, PRIOR["grid_size"] ** 2), generator=g)
    return text[rows], codes[rows]


def _step(model, text, codes) -> float:
    """One SGD step on the prior's loss; returns the loss."""
    loss = prior_loss(*model(text, codes), text, codes, 0.125)[0]
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # skips a rank's empty shards
    return loss.item()


def test_compile_switch_compiles_the_prior_in_place_with_the_same_logits(make_cfg, tiny_dvae):
    eager = tiny_module()
    compiled = tiny_module(compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()  # what Lightning calls before fitting
    assert compiled.model.prior._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unchanged
    grid, config = eager.model.dvae.grid_size, eager.model.prior.config
    text = torch.randint(0, config.text_vocab, (2, config.text_seq_len))
    codes = torch.randint(0, config.image_vocab, (2, grid * grid))
    for a, b in zip(compiled.model.prior(text, codes), eager.model.prior(text, codes), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    cfg = make_cfg(["model=dalle", "model.compile=yes", f"model.dvae_ckpt={tiny_dvae}"])
    with pytest.raises(ConfigError, match="model.compile='yes' is invalid: true or false"):
        build_stage(cfg)


def _powersgd_rank(rank: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    strategy = OmegaConf.load(CONF_DIR / "trainer" / "ddp_powersgd.yaml").strategy
    strategy.ddp_comm_state.start_powerSGD_iter = 2
    hook, state = instantiate(strategy.ddp_comm_hook), instantiate(strategy.ddp_comm_state)
    torch.manual_seed(0)
    model = DDP(PriorTransformer(PriorConfig(**PRIOR)))
    model.register_comm_hook(state, hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(4):  # 2 exact all-reduces, then compressed ones
        optimizer.zero_grad()
        text, codes = _batch(slice(2 * rank, 2 * rank + 2))
        loss = prior_loss(*model(text, codes), text, codes, 0.125)[0]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(
        {"weights": weights, "compressed": len(state.p_memory_dict), "losses": losses},
        f"{out}.{rank}",
    )
    dist.barrier()
    dist.destroy_process_group()


def test_powersgd_hook_from_the_config_compresses_the_priors_gradients(tmp_path):
    """The hook and state trainer=ddp_powersgd builds, on the prior in torch's DDP over 2 CPU
    processes (gloo; Lightning itself registers hooks on CUDA only): after the start step the
    gradient matrices go through rank-2 factors, and both ranks keep the same weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "powersgd")
    mp.spawn(_powersgd_rank, args=(port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    assert ranks[0]["compressed"] > 0  # low-rank factors were kept for some gradient buckets
    torch.testing.assert_close(ranks[0]["weights"], ranks[1]["weights"])
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)
