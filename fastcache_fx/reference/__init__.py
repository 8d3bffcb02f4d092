"""The bundled reference models (trained on scikit-learn digits), their samplers and metrics.

The DiT is exported here. The flow-matching MMDiT (``SD3Transformer2DModel``) lives in
``reference.mmdit`` / ``reference.mmdit_sampling`` (imported on demand: they pull in diffusers'
SD3 pipeline); ``reference.jobs.job("dit" | "mmdit")`` drives either for the demo and benchmarks.
"""

from .metrics import PSNR_CAP, class_accuracy, digits_fid, frechet_distance, psnr, psnr_db, save_grid, ssim
from .model import DIT_CONFIG, NULL_CLASS, DigitClassifier, build_dit, load, load_classifier, load_record
from .sampling import make_scheduler, sample

__all__ = [
    "DIT_CONFIG", "NULL_CLASS", "DigitClassifier", "build_dit", "class_accuracy", "digits_fid",
    "frechet_distance", "load", "load_classifier", "load_record", "make_scheduler", "psnr", "psnr_db", "PSNR_CAP",
    "sample", "save_grid", "ssim",
]
