"""The real service in a process of its own with a shadow version: `create_app` on
uvicorn (`serve_app`), the champion (version 1) a tiny LoRA model loaded from disk,
the `shadow` alias read from a file the test writes, as the registry's alias is read.

    python shadow_process.py MODEL_DIR BASE_DIR STORE_URL PORT SHADOW_FILE

Shadow versions: 2 is the same model with its temperature tripled (its own
confidences, the same labels); 3 raises on every text; 4 answers after 3 seconds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from tuneloop.model.classifier import Classifier, load_classifier
from tuneloop.service.serve import ChampionFollower, create_app, serve_app
from tuneloop.service.store import PredictionStore
from tuneloop.values.config import ServeConfig


class Tokenizer:
    """The model's tokenizer, made to fail or to be slow on every call."""

    def __init__(self, inner, fail: bool = False, delay_s: float = 0.0):
        self.inner, self.fail, self.delay_s = inner, fail, delay_s

    def __call__(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("the shadow version is broken")
        time.sleep(self.delay_s)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def loader(classifier: Classifier):
    def load(version: str) -> Classifier:
        return {"1": classifier,
                "2": replace(classifier, temperature=classifier.temperature * 3),
                "3": replace(classifier, tokenizer=Tokenizer(classifier.tokenizer, fail=True)),
                "4": replace(classifier, tokenizer=Tokenizer(classifier.tokenizer, delay_s=3.0))}[version]

    return load


def main(model_dir: str, base_dir: str, store_url: str, port: str, shadow_file: str) -> None:
    classifier = load_classifier(Path(model_dir), base_dir, "cpu")

    def shadow() -> str | None:
        return Path(shadow_file).read_text().strip() or None

    follower = ChampionFollower("tiny-model", "tiny-base", lambda: "1", loader(classifier), 0.2, shadow_lookup=shadow)
    app = create_app(follower, PredictionStore(store_url), ServeConfig(device="cpu", poll_seconds=0.2))
    serve_app(app, "127.0.0.1", int(port))


if __name__ == "__main__":
    main(*sys.argv[1:])
