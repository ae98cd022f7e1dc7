"""unstir: one learned object, the score of the noised data, and every correct way to use it."""

from .grids import GRIDS, time_grid
from .oracle import EXAMPLES, GaussianMixture
from .parametrization import PREDICTIONS, Denoiser, ModelOutput, convert
from .processes import DDPM, PROCESSES, VE, VP, Process, SubVP, make_process
from .samplers import SAMPLERS, SampleResult, sample
from .train import TrainConfig, load_run, train

__version__ = "0.1.0"

__all__ = [
    "DDPM", "Denoiser", "EXAMPLES", "GRIDS", "GaussianMixture", "ModelOutput", "PREDICTIONS", "PROCESSES",
    "Process", "SAMPLERS", "SampleResult", "SubVP", "TrainConfig", "VE", "VP", "convert", "load_run", "make_process",
    "sample", "time_grid", "train",
]
