"""The bundled reference DiT (trained on scikit-learn digits), its sampler and metrics."""

from .metrics import class_accuracy, digits_fid, frechet_distance, psnr, save_grid, ssim
from .model import DIT_CONFIG, NULL_CLASS, DigitClassifier, build_dit, load, load_classifier, load_record
from .sampling import make_scheduler, sample

__all__ = [
    "DIT_CONFIG", "NULL_CLASS", "DigitClassifier", "build_dit", "class_accuracy", "digits_fid",
    "frechet_distance", "load", "load_classifier", "load_record", "make_scheduler", "psnr",
    "sample", "save_grid", "ssim",
]
