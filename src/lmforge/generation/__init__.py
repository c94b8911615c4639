"""Text generation: the one batched engine (engine.py) and the limits every request obeys (limits.py).

Evaluation answers, `predict`, `generate`, `chat` and `serve` all sample through `BatchedGenerator`;
`eval/generate.py` keeps the small functions they call."""
