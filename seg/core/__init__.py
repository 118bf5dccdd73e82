"""The framework: hook specs, plugin manager, configuration, I/O, training and prediction drivers.

The core never imports ``seg.plugins``: built-in plugins are found through the ``seg`` entry-point group,
exactly like third-party ones.
"""
