"""densenet-debug: is a backend computing your gradients wrong, where, and why (or why not)?"""

from densenet_debug.models import BUILDERS, DenseNet, build_model, resolve_model

__version__ = "0.1.0"
__all__ = ["BUILDERS", "DenseNet", "build_model", "resolve_model", "__version__"]
