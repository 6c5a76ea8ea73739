"""The evaluation's tables and plots: results.json, results.csv, results.md (one table per
split, like the paper's), fid_vs_rerank.png and fid_vs_blur.png (its Fig. 9).

A row is one (split, k, blur radius): FID and IS of the best-of-k images against the split's
real images, both blurred with that radius (radius None and no FID with `fidelity=false`);
`clip_score` (mean reranker score of the chosen images) and, on shapes, `attribute_accuracy`
belong to (split, k) and repeat over radii.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from dalle_lightning.runs import write_text_atomic  # noqa: E402

COLUMNS = [
    "split",
    "k",
    "blur_radius",
    "fid",
    "is_mean",
    "is_std",
    "clip_score",
    "attribute_accuracy",
]


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_tables(rows: list[dict]) -> str:
    """Per split: one line per k; FID at every blur radius, IS (no blur), CLIP score, and
    attribute accuracy where there is one."""
    out = []
    for split in dict.fromkeys(r["split"] for r in rows):
        mine = [r for r in rows if r["split"] == split]
        radii = sorted({r["blur_radius"] for r in mine if r["blur_radius"] is not None})
        has_attr = any(r.get("attribute_accuracy") is not None for r in mine)
        head = ["k", *[f"FID blur {b}" for b in radii], *(["IS"] if radii else []), "CLIP score"]
        head += ["attribute acc."] if has_attr else []
        out += [f"### {split}", "", "| " + " | ".join(head) + " |"]
        out.append("|" + "---|" * len(head))
        for k in sorted({r["k"] for r in mine}):
            at = {r["blur_radius"]: r for r in mine if r["k"] == k}
            first = next(iter(at.values()))
            cells = [str(k), *[_fmt(at[b]["fid"]) for b in radii]]
            if radii:
                sharp = at.get(0, first)
                cells.append(f"{_fmt(sharp['is_mean'])} ± {_fmt(sharp['is_std'])}")
            cells.append(_fmt(first.get("clip_score"), 3))
            if has_attr:
                acc = first.get("attribute_accuracy")
                cells.append("-" if acc is None else f"{100 * acc:.1f}%")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], x: str, lines: str, path: Path, xlabel: str) -> None:
    """FID against `x` ("k" or "blur_radius"), one line per value of `lines`, one panel per
    split."""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        mine = [r for r in rows if r["split"] == split and r["fid"] is not None]
        for value in sorted({r[lines] for r in mine}):
            pts = sorted((r[x], r["fid"]) for r in mine if r[lines] == value)
            label = f"k={value}" if lines == "k" else f"blur {value}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if x == "k":
            ax.set_xscale("log", base=2)
        ax.set(title=split, xlabel=xlabel, ylabel="FID")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, rows: list[dict], protocol: dict) -> dict[str, Path]:
    files = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "md": out_dir / "results.md",
    }
    if any(r.get("fid") is not None for r in rows):
        files["fid_vs_rerank"] = out_dir / "fid_vs_rerank.png"
        files["fid_vs_blur"] = out_dir / "fid_vs_blur.png"
    # each file whole or not at all: a full disk or a kill never leaves half a table
    write_text_atomic(
        files["json"], json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n"
    )
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(files["csv"], table.getvalue())
    lines = ["# Evaluation", "", markdown_tables(rows), "## Protocol", "", "```json"]
    lines += [json.dumps(protocol, indent=2), "```", ""]
    write_text_atomic(files["md"], "\n".join(lines))
    if "fid_vs_rerank" in files:
        plot(rows, "k", "blur_radius", files["fid_vs_rerank"], "CLIP rerank count k (best of k)")
        plot(rows, "blur_radius", "k", files["fid_vs_blur"], "Gaussian blur radius (px)")
    return files
