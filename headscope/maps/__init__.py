"""Word maps: DAAM aggregation of per-head cross-attention (`daam`); more map methods land here."""
from headscope.maps import daam

__all__ = ["daam"]
