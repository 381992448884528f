"""selftrain: post-training an LLM on answers it generated and selected itself (MBR-style centrality)."""

__version__ = "0.1.0"
