"""Prefect flows that only compose stages; the work lives in `tasks/`."""
