"""The real service in a process of its own, for the slow-client test: the app
`tuneloop serve` builds (create_app, its middleware) on uvicorn with the
protocol `serve_app` gives it, answering with a tiny LoRA model loaded from disk.
Its memory is measured from outside, so nothing else runs in its process.

    python serve_process.py MODEL_DIR BASE_DIR STORE_URL PORT HEADER_SECONDS BODY_SECONDS
        (tokens from $TUNELOOP_TOKENS)
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneloop.model.classifier import load_classifier
from tuneloop.service.auth import load_tokens
from tuneloop.service.limits import SlowClientLimits
from tuneloop.service.serve import ChampionFollower, create_app, serve_app
from tuneloop.service.store import PredictionStore
from tuneloop.values.config import ServeConfig


def main(model_dir: str, base_dir: str, store_url: str, port: str, header_seconds: str, body_seconds: str) -> None:
    limits = SlowClientLimits(header_seconds=float(header_seconds), body_seconds=float(body_seconds))
    follower = ChampionFollower("tiny-model", "tiny-base", lambda: "1",
                                lambda version: load_classifier(Path(model_dir), base_dir, "cpu"), 60.0)
    app = create_app(follower, PredictionStore(store_url), ServeConfig(device="cpu"), load_tokens(None, Path(".")),
                     limits)
    serve_app(app, "127.0.0.1", int(port), limits)


if __name__ == "__main__":
    main(*sys.argv[1:])
