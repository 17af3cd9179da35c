from .hrnet import HRNet
from .stemnet import StemNet

__all__ = ["HRNet", "StemNet"]
