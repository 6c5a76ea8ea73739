"""`python demo.py`: the Gradio page over `DemoBackend` (the optional extra `.[demo]`).

Offline by design: Gradio's analytics are off, the theme's fonts are local, no share link
unless `server.share=true`, and it listens on `server.host` (127.0.0.1 by default). One queue
runs at most `server.max_concurrency` generations at a time and holds up to
`server.max_queue` waiting requests, so many users at once get their images in turn.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from dalle_lightning.config import ConfigError, require, require_bool, require_int
from dalle_lightning.demo.backend import Candidate, DemoBackend
from dalle_lightning.demo.request import DemoInputError, DemoLimits, check_request
from dalle_lightning.instantiate import build
from dalle_lightning.sampling.sampler import SamplingConfig

log = logging.getLogger(__name__)


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before the import reads it
    try:
        import gradio
    except ImportError:
        raise ConfigError(
            "demo", "gradio missing", 'the demo extra: pip install -e ".[demo]"'
        ) from None
    return gradio


def ranking_table(candidates: list[Candidate]) -> str:
    rows = "".join(
        f'<tr data-rank="{c.rank}" data-index="{c.index}" data-score="{c.score}">'
        f"<td>{c.rank}</td><td>{c.index}</td><td>{c.score:.4f}</td>"
        f"<td>{html.escape(c.verdict) or '(not a shapes caption: not checked)'}</td></tr>"
        for c in candidates
    )
    return (
        '<table id="ranking"><thead><tr><th>rank</th><th>drawn as</th><th>score</th>'
        f"<th>attribute checker</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def build_page(backend: DemoBackend, limits: DemoLimits, defaults: SamplingConfig, cfg):
    """The Gradio Blocks of the page; `cfg.server` sets its queue."""
    gr = import_gradio()
    guidance_trained = backend.model.caption_dropout > 0

    progress_bar = gr.Progress()  # Gradio injects its progress bar through this default

    def generate(
        caption, candidates, temperature, top_k, top_p, cond_scale, seed, progress=progress_bar
    ):
        try:
            request = check_request(
                caption,
                candidates,
                temperature,
                top_k,
                top_p,
                cond_scale,
                seed,
                limits,
                defaults,
                guidance_trained,
            )
        except DemoInputError as err:
            backend.rejected(str(err))
            return [], "", [], f"**Not generated.** {err}"

        def report(fraction: float) -> None:
            progress(fraction, desc="drawing image codes")

        chosen = backend.generate(request, report)
        gallery = [(str(c.png), f"#{c.rank} score {c.score:.3f}") for c in chosen]
        files = [str(c.png) for c in chosen]
        status = (
            f"{len(chosen)} candidates for seed {request.seed}, best first "
            f"(reranker: {backend.reranker.describe().get('name', 'CLIP')})."
        )
        return gallery, ranking_table(chosen), files, status

    top_k = defaults.top_k or 0
    top_p = defaults.top_p if defaults.top_p is not None else 1.0
    with gr.Blocks(title="dalle-lightning demo", analytics_enabled=False) as page:
        gr.Markdown(
            f"## dalle-lightning: text to image\nCheckpoint `{backend.ckpt_path}`. Candidates "
            "are drawn as `evaluate.py task=generate` draws them and ranked by the reranker; "
            "each PNG carries its caption, seed, settings and the command that redraws it."
        )
        with gr.Row():
            caption = gr.Textbox(
                label="Caption", placeholder="a red circle on the left", elem_id="caption", scale=4
            )
            button = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        with gr.Row():
            candidates = gr.Number(
                8,
                label=f"Candidates (1-{limits.max_candidates})",
                precision=None,
                elem_id="candidates",
            )
            temperature = gr.Number(defaults.temperature, label="Temperature", elem_id="temp")
            top_k_box = gr.Number(top_k, label="Top-k (0: off)", elem_id="top_k")
            top_p_box = gr.Number(top_p, label="Top-p (1: off)", elem_id="top_p")
            scale = gr.Number(
                defaults.cond_scale, label="Guidance scale (1: off)", elem_id="cond_scale"
            )
            seed = gr.Number(0, label="Seed", elem_id="seed")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label="Candidates, best first", columns=8, elem_id="gallery")
        table = gr.HTML(elem_id="ranking_box")
        files = gr.File(label="PNGs with metadata", file_count="multiple", elem_id="downloads")
        inputs = [caption, candidates, temperature, top_k_box, top_p_box, scale, seed]
        outputs = [gallery, table, files, status]
        button.click(
            generate,
            inputs,
            outputs,
            api_name="generate",
            concurrency_limit=cfg.server.max_concurrency,
        )
        caption.submit(generate, inputs, outputs, concurrency_limit=cfg.server.max_concurrency)
    page.queue(max_size=cfg.server.max_queue)
    return page


def check_server(server: DictConfig) -> None:
    require(
        isinstance(server.host, str) and server.host,
        "server.host",
        server.host,
        "an address to listen on, e.g. 127.0.0.1",
    )
    require_int("server.port", server.port, 0)
    require(server.port <= 65535, "server.port", server.port, "a port in 0-65535 (0: any free)")
    require_int("server.max_concurrency", server.max_concurrency, 1)
    require_int("server.max_queue", server.max_queue, 1)
    require_bool("server.share", server.share)


def serve(cfg: DictConfig, block: bool = True):
    """Check the config, load the prior and reranker, start the page; returns the Gradio app
    (and blocks until interrupted unless `block` is false)."""
    from dalle_lightning.evaluate import load_prior

    check_server(cfg.server)
    require_bool("attribute_check", cfg.attribute_check)
    limits = DemoLimits(**cfg.limits)
    import_gradio()  # a missing extra fails before the model loads
    out_dir = Path(cfg.paths.output_dir)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out_dir / "gradio_cache"))
    model, ckpt_path, sampling, batch_size = load_prior(cfg)
    reranker = build(cfg.reranker, "reranker")
    backend = DemoBackend(model, ckpt_path, reranker, out_dir, batch_size, cfg.attribute_check)
    page = build_page(backend, limits, sampling, cfg)
    log.info("demo: http://%s:%s (outputs in %s)", cfg.server.host, cfg.server.port, out_dir)
    page.launch(
        server_name=cfg.server.host,
        server_port=cfg.server.port or None,
        share=cfg.server.share,
        allowed_paths=[str(out_dir)],
        prevent_thread_lock=not block,
        inbrowser=False,
        ssr_mode=False,  # no Node.js server: the page is served by Python alone
    )
    return page
