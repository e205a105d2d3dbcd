"""pgfence: run PostgreSQL only while holding the fence on its data directory."""

__version__ = "0.1.0"
