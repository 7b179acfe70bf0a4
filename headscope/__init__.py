"""headscope: record, explain, rank and steer the cross-attention heads of text-to-image diffusion models."""
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.hrv import HRV
from headscope.maps import daam
from headscope.maps.images import image_maps
from headscope.models import load_pipeline
from headscope.steer import AttendAndExcite, Editor, HeadScale, adjust, edit, strengthen
from headscope.trace import Trace, trace

__version__ = "0.1.0"
__all__ = ["HRV", "AttendAndExcite", "Editor", "HeadIndex", "HeadScale", "HeadscopeError", "Trace", "adjust", "daam",
           "edit", "image_maps", "load_pipeline", "strengthen", "trace", "__version__"]
