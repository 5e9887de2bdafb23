"""mora_dist: distributed continual training of LLMs with MoRA rank experts."""

__version__ = "0.1.0"
