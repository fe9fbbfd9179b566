"""The query engine: an opened index and everything that answers a query against it.

``engine.index.InfluenceIndex.open`` loads and checks a published index (model, encoder,
vectors, lexical index, metadata) into one object implementing ``engine.protocols.Index``;
``engine.batch.run_batch`` answers queries against any ``Index`` (validate, encode,
retrieve), ``engine.explain.explain`` splits one result's score over its tokens. The
service, ``influence query`` and the evaluation all go through here. Importing this package
loads nothing heavy; its modules import torch where they need it.
"""
