"""FID/IS through our wrapper equal a direct torch-fidelity call; blur; best-of-k.

No real Inception weights exist on this machine: the tests save a randomly initialised
torch-fidelity InceptionV3 and pass it as the local weights file. FID and IS are then
meaningless numbers; what is tested is that our path computes exactly what torch-fidelity does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from dalle_lightning.checkpoints import file_sha256
from dalle_lightning.config import ConfigError
from dalle_lightning.evaluation.fidelity import blur_folder, fid_and_is, save_images, weights_record
from dalle_lightning.evaluation.random_inception import save_random_inception
from dalle_lightning.sampling.rerank import best_of_k


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved as a local weights file."""
    return save_random_inception(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    save_images(torch.rand(8, 3, 32, 32, generator=g), root / "generated")
    real = torch.rand(8, 3, 32, 32, generator=g) * 0.5  # a different distribution
    save_images(real, root / "real")
    return root / "generated", root / "real"


def test_fid_and_is_equal_a_direct_torch_fidelity_call(random_inception, folders):
    generated, real = folders
    ours = fid_and_is(generated, real, inception_weights=random_inception, isc_splits=2)
    direct = torch_fidelity.calculate_metrics(
        input1=str(generated),
        input2=str(real),
        fid=True,
        isc=True,
        isc_splits=2,
        feature_extractor_weights_path=str(random_inception),
        cuda=False,
        verbose=False,
    )
    assert ours["fid"] == pytest.approx(direct["frechet_inception_distance"], rel=1e-6)
    assert ours["is_mean"] == pytest.approx(direct["inception_score_mean"], rel=1e-6)
    assert ours["is_std"] == pytest.approx(direct["inception_score_std"], rel=1e-6, abs=1e-9)
    assert ours["fid"] > 0  # the two folders differ
    assert weights_record(random_inception)["sha256"] == file_sha256(random_inception)


def test_missing_weights_file_is_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="inception_weights=.*absent.pth"):
        fid_and_is(*folders, inception_weights=tmp_path / "absent.pth")


def test_failed_download_names_the_override(folders, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="pass inception_weights=PATH"):
        fid_and_is(*folders)


def test_save_images_is_lossless_8_bit(tmp_path):
    images = torch.randint(0, 256, (2, 3, 8, 8)).float() / 255
    (path, _) = save_images(images, tmp_path, start=5)
    assert path.name == "000005.png"
    back = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
    assert torch.equal(back, images[0])


def test_blur_folder_blurs_and_radius_zero_keeps_pixels(tmp_path):
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, 8:] = 1.0  # a sharp edge
    save_images(image, tmp_path / "src")
    sharp = np.asarray(Image.open(blur_folder(tmp_path / "src", tmp_path / "r0", 0) / "000000.png"))
    soft = np.asarray(Image.open(blur_folder(tmp_path / "src", tmp_path / "r2", 2) / "000000.png"))
    assert set(np.unique(sharp)) == {0, 255}
    assert 0 < soft[7, 0, 0] < 255 and 0 < soft[8, 0, 0] < 255  # the edge is now a ramp
    assert soft.mean() == pytest.approx(sharp.mean(), abs=2)  # blur moves no mass


def test_best_of_k_takes_the_best_of_nested_prefixes():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.8, 0.1, 0.3, 0.2]])
    chosen = best_of_k(scores, [1, 2, 4])
    assert chosen[1].tolist() == [0, 0]
    assert chosen[2].tolist() == [1, 0]
    assert chosen[4].tolist() == [3, 0]
    # nested: the chosen score never falls as k grows
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 16, generator=g)
    picks = best_of_k(scores, [1, 2, 4, 8, 16])
    best = [scores.gather(1, picks[k][:, None]) for k in (1, 2, 4, 8, 16)]
    assert all((b >= a).all() for a, b in zip(best, best[1:], strict=False))
    with pytest.raises(ConfigError, match="rerank_counts"):
        best_of_k(scores, [1, 32])
