"""Thin Prefect tasks around the visionpipe library: retries, caching, logs and artifacts."""
