"""vrex: a streaming video LLM (VideoLLM-online's LIVE loop) with V-Rex's ReSV KV retrieval."""

__version__ = "0.1.0"
