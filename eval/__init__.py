"""Plain Python: metrics, the Ollama judge, reports and plots. Never imports Prefect."""
