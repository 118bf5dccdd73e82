"""Built-in plugin module (being written)."""
