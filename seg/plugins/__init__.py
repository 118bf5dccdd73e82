"""Built-in plugins. Each module is registered through the ``seg`` entry-point group in setup.cfg."""
