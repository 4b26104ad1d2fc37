"""Training data: code corpora packed into fixed-length token sequences."""
