"""seg: plugin-based 3D CT organ segmentation.

Public API:

- ``seg.hookimpl``: the marker plugin authors decorate their ``register_*`` functions with.
- ``seg.predict_image(image, run_dir_or_model_file)``: segment a SimpleITK image in memory (``seg.core.predict``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # pluggy is imported on first use of ``seg.hookimpl``, so that the ``seg`` command can report it missing
    if name == "hookimpl":
        import pluggy

        globals()["hookimpl"] = pluggy.HookimplMarker("seg")
        return globals()["hookimpl"]
    raise AttributeError(f"module 'seg' has no attribute {name!r}")


def predict_image(image, run, **options):
    """Segment a SimpleITK ``image`` with the model of ``run``: a fine-tuning run folder or a ``seg export`` file.

    Returns a uint8 SimpleITK label map on exactly the grid of ``image``. Options are those of
    ``seg predict`` (``device``, ``precision``, ``overlap``...).
    """
    from seg.core.predict import predict_image as _predict_image

    return _predict_image(image, run, **options)


__all__ = ["hookimpl", "predict_image", "__version__"]
