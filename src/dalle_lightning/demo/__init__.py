"""`python demo.py`: a page to type a caption and see candidates ranked by a reranker.

- `request.py`: the page's values, checked (`check_request`, `DemoInputError`).
- `backend.py`: drawing, ranking, attribute checks and PNGs with metadata (`DemoBackend`).
- `page.py`: the Gradio page and `serve(cfg)` (the optional extra `.[demo]`).
"""
