"""Prefect tasks: thin wrappers over recranker_core with retries, logs and artifacts.

Importing this package masks credentials in every log record of the process (flow runs started
by the CLI, a worker or a Dask worker all import it), Prefect's API log handler included."""

from recranker_core.redact import install_log_masking

install_log_masking()
