"""Shared test helpers: waiting, the service as a subprocess, the accounting checker."""
