"""Embeddings: extraction to HDF5, nearest-neighbour search, kNN classification, retrieval metrics."""
