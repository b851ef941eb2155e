"""The loopback HTTP side: /metrics, /healthz and a read-only status page, in one server thread."""
