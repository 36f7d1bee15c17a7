"""Data: corpora, the embedded default corpus, sharding and batches for every objective."""
