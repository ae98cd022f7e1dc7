"""unstir: one learned object, the score of the noised data, and every correct way to use it."""

from .grids import GRIDS, time_grid
from .inversion import decode, encode, interpolate
from .likelihood import LikelihoodResult, log_likelihood
from .oracle import EXAMPLES, GaussianMixture
from .parametrization import PREDICTIONS, Denoiser, Model, ModelOutput, convert
from .processes import DDPM, PROCESSES, RF, VE, VP, Coefficients, Process, SubVP, make_process
from .runs import load_run
from .samplers import SAMPLERS, SampleResult, sample
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "Coefficients", "DDPM", "Denoiser", "Model", "RF", "EXAMPLES", "GRIDS", "GaussianMixture", "ModelOutput", "PREDICTIONS", "PROCESSES",
    "LikelihoodResult", "Process", "SAMPLERS", "SampleResult", "SubVP", "TrainConfig", "VE", "VP", "convert", "decode", "encode", "interpolate", "load_run", "log_likelihood", "make_process",
    "sample", "time_grid", "train",
]
