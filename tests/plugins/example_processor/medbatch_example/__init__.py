"""An example third-party processor for medbatch."""
