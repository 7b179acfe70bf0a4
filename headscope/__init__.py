"""headscope: record, explain, rank and steer the cross-attention heads of text-to-image diffusion models."""
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.models import load_pipeline
from headscope.trace import Trace, trace
from headscope.steer import HeadScale, adjust, strengthen
from headscope.editing import Editor, edit
from headscope.neglect import AttendAndExcite

__version__ = "0.1.0"
__all__ = ["AttendAndExcite", "Editor", "HeadIndex", "HeadScale", "HeadscopeError", "Trace", "adjust", "edit",
           "load_pipeline", "strengthen", "trace", "__version__"]
