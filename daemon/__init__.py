"""medbatch: batch processing service for hospital drop folders."""

__version__ = "0.1.0"
