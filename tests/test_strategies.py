"""Scale-out configs: trainer=fsdp and trainer=ddp_powersgd build what they name, refuse what
cannot run; the FSDP wrap policy shards our models and the PowerSGD hook compresses their
gradients (two CPU processes, gloo).

Lightning's FSDPStrategy refuses CPU accelerators, so the two-process check wraps the prior
with torch's FullyShardedDataParallel directly, using the policy trainer=fsdp instantiates;
the Lightning run itself needs a GPU machine (docs/scaling.md records what was run)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import OmegaConf
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from dalle_lightning.config import ConfigError
from dalle_lightning.instantiate import build, check_trainer
from dalle_lightning.models.dvae import DVAE, DVAEConfig, ResBlockGroup
from dalle_lightning.models.transformer import Block, PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import prior_loss
from dalle_lightning.stages import build_stage
from tests.conftest import CONF_DIR
from tests.test_dalle_train import tiny_module

PRIOR = dict(text_vocab=64, text_seq_len=8, image_vocab=32, grid_size=4, dim=32, depth=3, heads=2)


def _policy():
    strategy = OmegaConf.load(CONF_DIR / "trainer" / "fsdp.yaml").strategy
    return instantiate(strategy.auto_wrap_policy)


def test_fsdp_config_builds_the_strategy_with_our_wrap_units(make_cfg):
    cfg = make_cfg(["trainer=fsdp", "trainer.strategy.state_dict_type=sharded"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["use_orig_params"] is True  # the frozen dVAE shares the root unit
    assert _policy()._module_classes == {Block, ResBlockGroup}
    checkpointed = make_cfg(
        ["trainer=fsdp", "trainer.strategy.activation_checkpointing_policy=${.auto_wrap_policy}"]
    )
    assert instantiate(checkpointed.trainer.strategy)._activation_checkpointing_kwargs
    # the prior's blocks and the dVAE's resolution groups are what the policy wraps
    dvae = DVAE(DVAEConfig(image_size=32, n_hid=8, n_init=8, vocab_size=32, group_count=3))
    assert sum(isinstance(m, ResBlockGroup) for m in dvae.modules()) == 6  # 3 enc + 3 dec


def test_fsdp_on_cpu_is_refused_before_any_work(make_cfg):
    cfg = make_cfg(["trainer=fsdp", "trainer.accelerator=cpu"])
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


def _fsdp_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = FSDP(
        PriorTransformer(PriorConfig(**PRIOR)),
        auto_wrap_policy=_policy(),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    local = sum(p.numel() for p in model.parameters())
    loss = torch.tensor(_step(model, *_batch(slice(2 * rank, 2 * rank + 2))))
    dist.all_reduce(loss)
    gathered = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, gathered):
        state = model.state_dict()
    if rank == 0:
        units = sum(isinstance(m, FSDP) for m in model.modules())
        torch.save({"state": state, "loss": loss / 2, "units": units, "local": local}, out)
    dist.barrier()  # neither rank leaves while the other still talks
    dist.destroy_process_group()


def test_fsdp_policy_shards_the_prior_and_trains_it_as_one_process_does(tmp_path):
    with socket.socket() as s:  # a free port for the two ranks
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_rank, args=(port, out), nprocs=2, join=True)
    result = torch.load(Path(out), weights_only=True)
    torch.manual_seed(0)
    single = PriorTransformer(PriorConfig(**PRIOR))
    total = sum(p.numel() for p in single.parameters())
    loss = _step(single, *_batch(slice(0, 4)))
    assert result["units"] == PRIOR["depth"] + 1  # each Block, and the root
    assert result["local"] <= total // 2 + 64  # each rank holds about half (padding aside)
    assert result["loss"].item() == pytest.approx(loss, rel=1e-5)
    expected = single.state_dict()
    assert set(result["state"]) == set(expected)  # a full state dict loads without FSDP
    for key, value in expected.items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


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
