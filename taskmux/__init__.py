"""taskmux: one shared transformer encoder, many light task heads, served over gRPC."""

__version__ = "0.1.0"
