"""semclust: embeddings, clusters, a kNN graph and a searchable index for millions of images."""

__version__ = "0.1.0"
