"""Prefect flows: composition only; the work lives in `tasks/`."""
