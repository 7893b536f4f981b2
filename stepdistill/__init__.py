"""stepdistill: distil multi-step diffusion and flow models into one- to four-step generators."""
from .conditioning import Cond
from .denoiser import Denoiser, cfg
from .schedule import NoiseSchedule

__version__ = "0.1.0"
__all__ = ["Cond", "Denoiser", "NoiseSchedule", "cfg", "__version__"]
