"""The serving peer a team writes by hand: a transformers `pipeline` behind FastAPI.

    TUNELOOP_BENCH_MODEL=<folder> TUNELOOP_BENCH_MAX_LENGTH=128 \\
        python -m uvicorn benchmarks.pipeline_server:app --port 8002

A sequence-classification model built from the base encoder (the same six
layers and max length as the champion, an untrained two-label head: the same
compute per text, not a model anyone would serve), one pipeline call per
request, FastAPI's thread pool running concurrent requests side by side. No
logging of predictions. Used by benchmarks/serve_load.py only.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

FOLDER = os.environ["TUNELOOP_BENCH_MODEL"]
MAX_LENGTH = int(os.environ.get("TUNELOOP_BENCH_MAX_LENGTH", "128"))

classify = pipeline("text-classification",
                    model=AutoModelForSequenceClassification.from_pretrained(FOLDER, num_labels=2).eval(),
                    tokenizer=AutoTokenizer.from_pretrained(FOLDER), device="cpu")
app = FastAPI()


class Texts(BaseModel):
    texts: list[str]


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/predict")
def predict(body: Texts) -> list[dict]:
    return classify(body.texts, batch_size=32, truncation=True, max_length=MAX_LENGTH)
