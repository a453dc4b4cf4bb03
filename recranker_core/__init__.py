"""recranker: a batch recommender with an instruction-tuned LLM ranker (core library; no Prefect)"""

__version__ = "0.1.0"
