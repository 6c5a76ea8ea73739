"""Every shipped config option composes, and the objects it names can be built."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dalle_lightning.config import ConfigError
from dalle_lightning.instantiate import build, build_all
from dalle_lightning.models.dvae import DVAE, DVAEConfig
from dalle_lightning.models.transformer import PriorConfig, PriorTransformer
from dalle_lightning.modules.losses import DVAELoss
from dalle_lightning.stages import build_stage, dvae_module
from tests.conftest import CONF_DIR, ROOT

LEGACY_DVAE = ROOT / "tests" / "fixtures" / "legacy" / "dvae_main_d5d9626.ckpt"

GROUPS = [
    "dataset",
    "model",
    "callbacks",
    "logger",
    "trainer",
    "schedule",
    "data_mix",
    "paths",
    "hydra",
    "debug",
    "experiment",
    "hparams_search",
    "launcher",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


OPTIONS = [(g, o) for g in GROUPS for o in _options(g)]


def test_train_defaults_list_has_the_documented_groups():
    text = (CONF_DIR / "train.yaml").read_text()
    for entry in [
        "dataset: shapes",
        "model: dvae",
        "callbacks: default",
        "logger: default",
        "trainer: default",
        "optional schedule: ${model}",
        "optional data_mix: ${model}_${dataset}",
        "paths: default",
        "hydra: default",
        "experiment: null",
        "hparams_search: null",
        "launcher: null",
        "debug: null",
    ]:
        assert f"- {entry}" in text, entry


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(make_cfg, group, option):
    cfg = make_cfg([f"{group}={option}"])
    assert cfg.model._target_ and cfg.dataset._target_
    # everything but Hydra's own section resolves (interpolations included)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(job, resolve=True)
    if group in ("callbacks", "logger"):
        if group == "logger" and option == "wandb":
            pytest.importorskip("wandb")
        objects = build_all(cfg[group], group)
        assert len(objects) == len([k for k in cfg[group] if "_target_" in cfg[group][k]])
    if group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            if option == "fsdp":  # Lightning's FSDP needs CUDA: test_strategies.py
                return
            cfg.trainer.accelerator, cfg.trainer.precision = "cpu", "32-true"
        trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False)
        assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("option", _options("debug") + _options("trainer"))
def test_evaluate_config_composes(make_cfg, option):
    group = "debug" if option in _options("debug") else "trainer"
    cfg = make_cfg([f"{group}={option}"], config_name="evaluate")
    assert cfg.task == "metrics" and cfg.split == "test"


def test_run_dirs_are_named_by_task_and_timestamp(make_cfg):
    cfg = make_cfg([])
    assert cfg.task_name == "train_dvae"
    assert cfg.hydra.run.dir.split("/")[-3:-1] == ["train_dvae", "runs"]
    assert cfg.hydra.sweep.dir.split("/")[-3:-1] == ["train_dvae", "multiruns"]
    ecfg = make_cfg([], config_name="evaluate")
    assert ecfg.task_name == "evaluate_metrics"
    assert ecfg.hydra.sweep.dir.split("/")[-3:-1] == ["evaluate_metrics", "multiruns"]


def test_shapes_dvae_experiment_is_the_default_run(make_cfg):
    default, experiment = make_cfg([]), make_cfg(["experiment=shapes_dvae"])
    for key in ("model", "dataset"):
        assert default[key] == experiment[key], key
    assert default.trainer.max_steps == experiment.trainer.max_steps


def test_paper_dvae_has_the_paper_sizes_and_schedules(make_cfg):
    cfg = make_cfg(["experiment=paper_dvae"])
    net = cfg.model.net
    assert (net.image_size, net.vocab_size, net.n_hid, net.group_count, net.n_blk_per_group) == (
        256,
        8192,
        256,
        4,
        2,
    )
    assert cfg.model.kl_warmup_steps == 5000 and cfg.model.temp_anneal_steps == 150_000
    assert cfg.model.beta == 6.6 and cfg.model.usage_weight == 0.0  # no demo deviations
    assert cfg.model.recon_loss == "logit_laplace" and cfg.model.tau_end == 0.0625
    assert cfg.model.optimizer.lr == 1e-4
    assert cfg.model.optimizer.lr * cfg.model.lr_final_ratio == pytest.approx(1.25e-6)
    assert cfg.model.lr_decay_steps == 1_200_000 and cfg.trainer.max_steps == 3_000_000
    assert cfg.model.lr_warmup_steps == 0
    total_batch = cfg.dataset.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
    assert total_batch == 512 and cfg.trainer.precision == "16-mixed"
    with torch.device("meta"):
        model = DVAE(DVAEConfig(**cfg.model.net))
    assert model.grid_size == 32


def test_model_config_builds_the_module_from_typed_configs(make_cfg):
    cfg = make_cfg(["model.net.n_hid=16", "model.beta=0.5", "model.tau_end=0.1"])
    module = dvae_module(cfg.model)
    assert module.net.config == DVAEConfig(**cfg.model.net)
    assert module.net.config.n_hid == 16 and module.net.config.image_size == cfg.dataset.image_size
    assert module.loss == DVAELoss(beta=0.5, usage_weight=1.0, recon_loss="mse", mse_sigma=0.1)
    assert module.schedule.tau_end == 0.1 and module.schedule.lr_warmup_steps == 200
    # the checkpoint's hyper_parameters mirror the yaml: the same module is built from them
    again = dvae_module(OmegaConf.create(dict(module.hparams)))
    assert (again.net.config, again.loss, again.schedule) == (
        module.net.config,
        module.loss,
        module.schedule,
    )


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ("dataset.num_val=0", "dataset.num_val", ">= 1"),
        ("dataset.heldout_fraction=0.9", "dataset.heldout_fraction", "[0.0, 0.5]"),
        ("model.beta=-1", "model.beta", ">= 0.0"),
        ("model.net.n_hid=30", "model.net.n_hid", "a multiple of 4"),
        ("model.beta=strong", "model.beta", "a number"),
        ("model.net.n_hid=wide", "model.net.n_hid", "an integer"),
        ("model.lr_decay_steps=soon", "model.lr_decay_steps", "an integer or null"),
        ("model.compile=1", "model.compile", "true or false"),
        ("model.num_logged_images=-1", "model.num_logged_images", ">= 0"),
        ("+model.net.n_hidden=64", "model.net.n_hidden", "not a field; model.net has"),
        ("+model.betta=1", "model.betta", "not a field; model has"),
    ],
)
def test_bad_fields_are_named_as_the_user_types_them(make_cfg, override, field, allowed):
    """Unknown keys, wrong types and ranges: one ConfigError naming group.field, at the
    edge (the stage's typed configs), before any data is read."""
    cfg = make_cfg([override])
    with pytest.raises(ConfigError) as err:
        build_stage(cfg)
    assert err.value.field == field
    assert allowed in str(err.value) and "\n" not in str(err.value)


def test_sizes_the_prior_takes_from_the_dvae_cannot_be_set(make_cfg):
    cfg = make_cfg(["model=dalle", "+model.net.grid_size=16", f"model.dvae_ckpt={LEGACY_DVAE}"])
    with pytest.raises(ConfigError, match="come from the dVAE checkpoint") as err:
        build_stage(cfg)
    assert err.value.field == "model.net.grid_size"


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")
@pytest.mark.parametrize("experiment", ["shapes_dvae", "paper_dvae", "shapes_dalle", "paper_dalle"])
def test_every_experiment_builds_its_stage_configs(make_cfg, experiment):
    """Every key of each experiment's model group lands in a typed config (on the meta
    device: the paper's sizes are 12B parameters)."""
    dvae = [f"model.dvae_ckpt={LEGACY_DVAE}"] if "dalle" in experiment else []
    cfg = make_cfg([f"experiment={experiment}", *dvae])
    if "dalle" in experiment:
        cfg.dataset.image_size = 32  # the legacy dVAE's
    with torch.device("meta"):
        stage = build_stage(cfg)
    module = stage.module
    if "dvae" in experiment:
        assert module.net.config == DVAEConfig(**cfg.model.net)
        assert module.loss.beta == cfg.model.beta
    else:
        prior = module.model.prior.config
        assert (prior.dim, prior.depth, prior.attention) == (
            cfg.model.net.dim,
            cfg.model.net.depth,
            cfg.model.net.attention,
        )
        assert prior.text_seq_len == cfg.model.text.text_seq_len and prior.grid_size == 8
        assert module.schedule.warmup_steps == cfg.model.warmup_steps
        assert module.model.sampling.cond_scale == cfg.model.sampling.cond_scale


def test_shapes_dalle_experiment_is_model_dalle(make_cfg):
    default, experiment = make_cfg(["model=dalle"]), make_cfg(["experiment=shapes_dalle"])
    for key in ("model", "dataset", "trainer"):
        assert default[key] == experiment[key], key


@pytest.mark.parametrize(
    ("overrides", "steps", "batch"),
    [
        (["model=dvae"], 8000, 8),  # schedule/dvae.yaml
        (["model=dalle"], 4500, 16),  # schedule/dalle.yaml
        (["model=clip"], 1500, 64),  # no schedule/clip.yaml: trainer/default's budget
        (["model=dalle", "trainer.max_steps=7"], 7, 16),  # the command line wins
        (["model=dalle", "debug=limit"], 20, 16),  # debug configs win
        (["experiment=paper_dalle"], 430_000, 1),  # experiments win
        (["model=dvae", "experiment=shapes_quick"], 600, 8),  # schedule/dvae_quick.yaml
        (["model=dalle", "experiment=shapes_quick"], 600, 16),  # schedule/dalle_quick.yaml
        (["model=clip", "experiment=shapes_quick"], 300, 64),  # schedule/clip_quick.yaml
    ],
)
def test_each_stage_has_its_own_step_budget(make_cfg, overrides, steps, batch):
    cfg = make_cfg(overrides)
    assert (cfg.trainer.max_steps, cfg.dataset.batch_size) == (steps, batch)
    if "experiment=shapes_quick" in overrides:  # the smoke recipe validates once, at the end
        assert cfg.trainer.val_check_interval == steps and cfg.dataset.num_train == 4000
        if cfg.model._target_.endswith("DVAEModule"):  # tau reaches its end value
            assert cfg.model.temp_anneal_steps == steps


@pytest.mark.parametrize(
    ("overrides", "two_object_prob", "num_train"),
    [
        (["model=dalle"], 0.7, 16_000),  # data_mix/dalle_shapes.yaml: the mix, not the size
        (["model=dvae"], 0.5, 16_000),  # no data_mix/dvae_shapes.yaml: the dataset's own
        (["model=clip"], 0.5, 16_000),
        (["model=dalle", "dataset.two_object_prob=0.3"], 0.3, 16_000),  # the command line wins
        (["model=dalle", "dataset.num_train=72000"], 0.7, 72_000),
        # experiments come after data_mix in train.yaml's defaults; data_mix sets no size
        # today, so this pits the smoke recipe's 4,000 only against the dataset's 16,000
        (["model=dalle", "experiment=shapes_quick"], 0.7, 4_000),
        (["model=dalle", "dataset=coco"], None, None),  # shapes only: COCO has no such fields
    ],
)
def test_the_prior_trains_on_more_two_object_captions(
    make_cfg, overrides, two_object_prob, num_train
):
    dataset = make_cfg(overrides).dataset
    assert (dataset.get("two_object_prob"), dataset.get("num_train")) == (
        two_object_prob,
        num_train,
    )


def test_an_experiment_overrides_what_data_mix_sets(make_cfg, tmp_path):
    """train.yaml lists `experiment` after `data_mix`, so an experiment's value of a key that
    data_mix sets wins (none of the shipped experiments sets one: a probe experiment on an extra
    search path does), and the command line wins over both."""
    (tmp_path / "probe" / "experiment").mkdir(parents=True)
    (tmp_path / "probe" / "experiment" / "mix_probe.yaml").write_text(
        "# @package _global_\ndataset:\n  two_object_prob: 0.2\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path / 'probe'}]"
    probe = ["model=dalle", "experiment=mix_probe", search]
    assert make_cfg(probe).dataset.two_object_prob == 0.2  # data_mix's 0.7 without it
    assert make_cfg([*probe, "dataset.two_object_prob=0.4"]).dataset.two_object_prob == 0.4


def test_evaluation_scores_on_the_shapes_own_mix(make_cfg):
    assert make_cfg([], config_name="evaluate").dataset.two_object_prob == 0.5


def test_dvae_tau_anneals_before_the_decoder_trains_alone(make_cfg):
    cfg = make_cfg(["model=dvae"])
    # tau is 1/16 and the lr cosine ends where the decoder-only phase starts, inside the run
    assert cfg.model.temp_anneal_steps == cfg.model.decoder_only_from < cfg.trainer.max_steps


def test_paper_dalle_has_the_paper_sizes_and_builds_on_meta(make_cfg):
    cfg = make_cfg(["experiment=paper_dalle"])
    text, net = cfg.model.text, cfg.model.net
    assert (text.vocab_size, text.text_seq_len) == (16384, 256)
    assert (net.depth, net.heads, net.dim // net.heads, net.attention) == (64, 62, 64, "sparse")
    assert tuple(cfg.model.optimizer.betas) == (0.9, 0.96) and cfg.model.grad_clip_norm == 4.0
    assert cfg.model.anneal_fraction == 0  # halvings on plateaus only, as in the paper
    assert cfg.model.caption_dropout == 0 and cfg.model.sampling.cond_scale == 1  # no guidance
    assert (cfg.model.sampling.temperature, cfg.model.sampling.top_p) == (1.0, None)
    with torch.device("meta"):  # grid and codes from the paper dVAE's config, as in training
        dvae = DVAE(DVAEConfig(**make_cfg(["experiment=paper_dvae"]).model.net))
        prior = PriorTransformer(
            PriorConfig(
                text_vocab=text.vocab_size,
                text_seq_len=text.text_seq_len,
                image_vocab=dvae.vocab_size,
                grid_size=dvae.grid_size,
                **cfg.model.net,
            )
        )
    assert prior.config.seq_len == 256 + 32 * 32
    assert 11.5e9 < sum(p.numel() for p in prior.parameters()) < 12.5e9


@pytest.mark.parametrize(
    ("dataset", "splits", "num_captions"),
    [("shapes", ["test", "heldout"], 64), ("coco", ["val"], 30000), ("cub", ["test"], None)],
)
def test_evaluation_protocol_follows_the_dataset(make_cfg, dataset, splits, num_captions):
    cfg = make_cfg([f"dataset={dataset}"], config_name="evaluate")
    assert list(cfg.splits) == splits and cfg.num_captions == num_captions
    assert list(cfg.rerank_counts) == [1, 2, 4, 8, 16, 32]
    assert list(cfg.blur_radii) == [0, 1, 2, 4, 8]
    override = make_cfg([f"dataset={dataset}", "num_captions=32"], config_name="evaluate")
    assert override.num_captions == 32


def test_reranker_options_compose(make_cfg):
    trained = make_cfg([], config_name="evaluate").reranker
    assert trained._target_.endswith("TrainedClip") and trained.ckpt_path is None
    open_clip = make_cfg(["reranker=open_clip"], config_name="evaluate").reranker
    assert (open_clip.model_name, open_clip.pretrained) == ("ViT-B-32", "openai")


def test_clip_model_sets_a_contrastive_batch(make_cfg):
    cfg = make_cfg(["model=clip"])
    assert cfg.task_name == "train_clip" and cfg.dataset.batch_size == 64
    assert cfg.model.net.image_size == cfg.dataset.image_size
