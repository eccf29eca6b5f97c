"""Work pools and the ``gpu`` concurrency limit (``python -m deployments.pools``)."""
