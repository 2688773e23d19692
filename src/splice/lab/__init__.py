"""The lab: a local page that shows LoRA on the loaded model (`splice lab`).

    from splice.lab import create_app
    app = create_app(model, tokenizer, library="adapters/")   # an ASGI app; serve on 127.0.0.1

Panels: Rank (`rank`), Memory (`memory`), Train (`training`), Library (`bench`) and Family (the
method registry); `app` routes the page's requests to them and `serve` runs the server. The
page itself is `static/` (plain HTML, CSS and SVG drawn by its own small script).
"""

from splice.lab.app import create_app

__all__ = ["create_app"]
