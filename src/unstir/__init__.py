"""unstir: one learned object, the score of the noised data, and every correct way to use it."""

from .grids import GRIDS, time_grid
from .guidance import autoguidance, cfg, guided
from .inverse import Measurement, dps, pigdm, repaint, twisted_smc
from .inversion import decode, encode, interpolate
from .likelihood import LikelihoodResult, log_likelihood
from .oracle import EXAMPLES, GaussianMixture, LowRankMixture, image_mixture
from .parametrization import PREDICTIONS, Denoiser, Model, ModelOutput, convert
from .processes import DDPM, PROCESSES, RF, VE, VP, Coefficients, Process, SubVP, make_process
from .runs import load_run
from .samplers import SAMPLERS, SampleResult, sample
from .training import TrainConfig, train
from .tuning import TunedGrid, pilot_grid, tune_grid

__version__ = "0.1.0"

__all__ = [
    "Coefficients", "DDPM", "Denoiser", "Model", "RF", "EXAMPLES", "GRIDS", "GaussianMixture", "LowRankMixture", "image_mixture", "ModelOutput", "PREDICTIONS", "PROCESSES",
    "LikelihoodResult", "Measurement", "Process", "SAMPLERS", "SampleResult", "SubVP", "TrainConfig", "VE", "VP", "autoguidance", "cfg", "convert", "decode", "dps", "encode", "guided", "interpolate", "load_run", "log_likelihood", "make_process",
    "pigdm", "pilot_grid", "repaint", "sample", "twisted_smc", "time_grid", "train", "TunedGrid", "tune_grid",
]
