"""Prefect flows: each reads as the table of contents of its DAG."""
