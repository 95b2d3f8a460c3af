"""gptflow: a data-to-deployment pipeline for GPT-style language models.

This package is the base layer every other layer imports: settings, atomic storage, mirror-aware
downloads, the GPT-2 tokenizer and the data preparation functions. It imports neither Prefect nor torch
(the edge runtime depends on that); the `gptflow` command is the top-level `cli` package.
"""

__version__ = "0.1.0"
