"""Your own images: a folder and a `captions.jsonl` with one JSON object per line,

    {"image": "relative/path.jpg", "caption": "a dog on a sofa"}
    {"image": "other.png", "captions": ["first caption", "second caption"]}

Paths are relative to the folder. A line that is not such an object stops with its line
number; images listed but missing on disk are skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from dalle_lightning.config import require
from dalle_lightning.data.captioned_images import CaptionedImage, drop_missing


def read_folder(root: str | Path, captions_file: str = "captions.jsonl") -> list[CaptionedImage]:
    root = Path(root)
    path = root / captions_file
    require(
        path.is_file(),
        "dataset.root",
        str(root),
        f"a folder of images with a {captions_file} (lines of "
        '{"image": "relative/path.jpg", "caption": "..."})',
    )
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions = entry["captions"] if "captions" in entry else [entry["caption"]]
            image = entry["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{number}: expected "
                '{"image": "relative/path.jpg", "caption": "..."} or "captions": [...], '
                f"got {line[:80]!r} ({type(err).__name__}: {err})"
            ) from None
        captions = tuple(str(c).strip() for c in captions if str(c).strip())
        if captions:
            items.append(CaptionedImage(root / image, captions))
    return drop_missing(items, str(path))
