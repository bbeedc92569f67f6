"""The HTTP routes, one module per endpoint family (ops, models, embeddings, embed_v2, multimodal,
score, rerank, search); each has a ``router`` that ``app.py`` includes."""
