"""`python -m dalle_lightning.evaluation.random_inception PATH`: a RANDOMLY INITIALISED
torch-fidelity InceptionV3 saved as a weights file, for dry runs of the evaluation where the
real weights cannot be downloaded (tests, offline machines).

FID and IS computed with it are meaningless numbers: use it to check that a pipeline runs
end to end, never to report results. With internet, torch-fidelity downloads the real
weights itself (leave `inception_weights` null).
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # build the extractor without its download: skip fetching and loading the real weights
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        torch.manual_seed(seed)
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # batch-norm statistics from one batch of random images: without them activations
    # vanish through the ~90 random layers and every image gets the same features (FID 0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (16, 3, 299, 299), dtype=torch.uint8))
    torch.save(model.state_dict(), path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dalle_lightning.evaluation.random_inception PATH")
    print(save_random_inception(sys.argv[1]), "(random weights: FID/IS are meaningless)")
