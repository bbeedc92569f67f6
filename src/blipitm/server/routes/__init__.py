"""The HTTP routes, one module per endpoint family (ops, models, embeddings, score, rerank,
search); each has a ``router`` that ``app.py`` includes."""
