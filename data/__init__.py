"""Data stages (plain Python + pandas): SMS spam, a user's labelled CSV, instructions, pretraining corpora."""
