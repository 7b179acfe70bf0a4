"""headscope: record, explain, rank and steer the cross-attention heads of text-to-image diffusion models."""
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.models import load_pipeline
from headscope.trace import Trace, trace

__version__ = "0.1.0"
__all__ = ["HeadIndex", "HeadscopeError", "Trace", "load_pipeline", "trace", "__version__"]
