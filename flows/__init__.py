"""Prefect flows: which stages run, in what order, with what parameters. No ML or data logic here."""
