"""Plain PyTorch: the GPT-2 architecture, weights, training, generation, fine-tuning heads and export.
Never imports Prefect."""
