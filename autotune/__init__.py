"""autotune: measure which parallel layout makes an LLM fastest on this machine."""

__version__ = "0.1.0"
