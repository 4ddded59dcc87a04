"""Reading, checking, fetching and making jina-reranker-m0 checkpoints."""
