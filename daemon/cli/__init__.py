"""The `medbatch` command line: one module per command, `main` parses and maps errors to exit
statuses."""

from daemon.cli.main import main

__all__ = ["main"]
