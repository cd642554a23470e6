"""The second engine: KServe's Python model server serving the exported artifact (docs/engines.md)."""
