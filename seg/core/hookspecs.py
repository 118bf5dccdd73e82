"""The hooks a plugin can implement. Each hands the plugin a ``register(name, factory)`` callback.

A plugin module implements any of these with ``@seg.hookimpl``; the factory contracts are spelled out
here and type-checked where they meet the core (``seg.core.plugins``).
"""

from pluggy import HookspecMarker

hookspec = HookspecMarker("seg")


@hookspec
def register_preprocessors(register):
    """Register preprocessing steps: ``register(name, factory)``.

    ``factory(**options) -> Preprocessor`` (``seg.core.preprocessing.Preprocessor``): called with a ``Sample``
    (SimpleITK image, optional label map on the same grid) it returns the new sample and a JSON-serialisable
    record; ``invert_label(label, record)`` maps a label map on the step's output grid back onto its input grid
    exactly (intensity-only steps return it unchanged). Steps raise ``DataError`` for inputs they cannot handle.
    """


@hookspec
def register_backbones(register):
    """Register segmentation networks: ``register(name, factory)``.

    ``factory(in_channels: int, out_channels: int, **options) -> torch.nn.Module`` whose forward maps
    (B, in, D, H, W) to (B, out, D, H, W). A backbone that SSL tasks can pretrain also follows
    ``seg.core.backbone.EncoderDecoder`` (``encode`` / ``decode`` / ``encoder_modules``).
    """


@hookspec
def register_ssl_tasks(register):
    """Register self-supervised pretext tasks: ``register(name, factory)``.

    ``factory(backbone: EncoderDecoder, **options) -> SSLTask`` (``seg.core.ssl.SSLTask``), a module whose
    ``training_step(views)`` returns the loss and logged metrics, and whose ``backbone`` holds the weights
    that ``seg run finetune --init`` loads.
    """


@hookspec
def register_losses(register):
    """Register supervised losses: ``register(name, factory)``.

    ``factory(num_classes: int, **options) -> torch.nn.Module`` mapping logits (B, C, D, H, W) and integer
    labels (B, D, H, W) to a scalar loss.
    """


@hookspec
def register_inferers(register):
    """Register inference strategies and label postprocessing: ``register(name, factory)``.

    ``factory(**options) -> Inferer`` (``seg.core.inference.Inferer``): called with a network and a
    preprocessed image (1, C, D, H, W), returns class scores (K, D, H, W). Postprocessing steps
    (``seg.core.inference.Postprocessor``) are registered in this family too: they map a label array to
    a label array.
    """
