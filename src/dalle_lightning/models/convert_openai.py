"""Load the official openai/DALL-E dVAE weights into `DVAE`.

The official encoder and decoder (`dall_e/encoder.py`, `decoder.py`) name their parameters
`blocks.<...>.w` and `.b`; ours are the same paths with `.weight` and `.bias`, under
`encoder.` and `decoder.`. Sizes (n_hid, vocab, groups, blocks per group, n_init) are read
from the tensor shapes; the image size is not stored in the weights (the official one is 256).

    python -m dalle_lightning.models.convert_openai --encoder encoder.pkl --decoder decoder.pkl \
        --out dvae_openai.pt [--image-size 256] [--allow-pickle]

The official files (cdn.openai.com/dall-e/encoder.pkl, decoder.pkl) are pickled modules, not
state dicts: reading them runs pickle, which can execute code, and needs the `dall_e` package
(`pip install DALL-E`) for the classes. That is why it takes `--allow-pickle`. A state dict
saved from them (`torch.save(enc.state_dict(), ...)`) loads without it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import Tensor

from dalle_lightning.checkpoints import export_dvae
from dalle_lightning.models.dvae import DVAE, DVAEConfig


def _rename(key: str) -> str:
    return re.sub(r"\.w$", ".weight", re.sub(r"\.b$", ".bias", key))


def infer_config(
    encoder: dict[str, Tensor], decoder: dict[str, Tensor], image_size: int
) -> DVAEConfig:
    groups = sorted(
        {int(m.group(1)) for k in encoder if (m := re.match(r"blocks\.group_(\d+)\.", k))}
    )
    blocks = {
        int(m.group(1)) for k in encoder if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))
    }
    if (
        not groups
        or not blocks
        or "blocks.input.w" not in encoder
        or "blocks.input.w" not in decoder
    ):
        raise ValueError(
            "not an official DALL-E encoder/decoder state dict: expected keys like "
            "'blocks.input.w' and 'blocks.group_1.block_1.res_path.conv_1.w'"
        )
    n_hid, input_channels = encoder["blocks.input.w"].shape[:2]
    return DVAEConfig(
        image_size=image_size,
        input_channels=int(input_channels),
        vocab_size=int(encoder["blocks.output.conv.w"].shape[0]),
        n_hid=int(n_hid),
        n_init=int(decoder["blocks.input.w"].shape[0]),
        group_count=len(groups),
        n_blk_per_group=len(blocks),
    )


def convert(encoder: dict[str, Tensor], decoder: dict[str, Tensor], image_size: int = 256) -> DVAE:
    """Official encoder and decoder state dicts -> a `DVAE` holding exactly those weights."""
    model = DVAE(infer_config(encoder, decoder, image_size))
    state = {f"encoder.{_rename(k)}": v for k, v in encoder.items()}
    state |= {f"decoder.{_rename(k)}": v for k, v in decoder.items()}
    state = {k: v.float() for k, v in state.items()}  # the official convs may be stored in fp16
    model.load_state_dict(state, strict=True)
    return model


def _load_state(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        hint = "" if allow_pickle else " (a pickled module needs --allow-pickle; see --help)"
        raise RuntimeError(f"cannot read {path}: {err}{hint}") from err
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--decoder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--allow-pickle", action="store_true", help="load pickled modules (runs pickle)"
    )
    args = parser.parse_args(argv)
    model = convert(
        _load_state(args.encoder, args.allow_pickle),
        _load_state(args.decoder, args.allow_pickle),
        args.image_size,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_dvae(model), args.out)
    print(f"wrote {args.out}: {model.config}")
    return args.out


if __name__ == "__main__":
    main()
