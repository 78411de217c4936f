"""DP-SGD retraining through Opacus, returning the model and a truthful :class:`PrivacyReport`.

The algorithm is DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", §3.1,
Algorithm 1): Poisson-sampled logical batches, per-example gradients clipped to ``max_grad_norm``,
Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` added to their sum. The
privacy loss of the whole run is composed by the PRV accountant (Gopi et al. 2021, "Numerical
Composition of Differential Privacy", §5) or, on request, by Rényi DP (Mironov 2017, §3; the
subsampled Gaussian bound of Mironov, Talwar & Zhang 2019). One entry point, :func:`train_private`,
plays the role of Opacus's ``PrivacyEngine``; :func:`train_private_distributed` runs the same
training over ``torch.distributed`` (gloo) with Opacus's ``DPDDP``.
"""
from guard.dp.checkpoint import MODEL_FILE, REPORT_FILE, load, load_state_dict, save
from guard.dp.checks import (
                             ACCOUNTANTS,
                             GRAD_SAMPLE_MODES,
                             MAX_NOISE_MULTIPLIER,
                             DPConfigError,
                             UnsupportedLayersError,
                             as_tensors,
                             default_delta,
                             prepare_model,
)
from guard.dp.distributed import train_private_distributed
from guard.dp.recipe import DP_RECIPE, DPRecipe
from guard.dp.preprocessing import PREPROCESSING_FILE, Preprocessing, RawFeatureModel
from guard.dp.report import PrivacyReport
from guard.dp.training import (
                             DEFAULT_GRAD_SAMPLE_MODE,
                             accuracy,
                             make_private,
                             privacy_engine,
                             run_epoch,
                             train_non_private,
                             train_private,
)

__all__ = ["ACCOUNTANTS", "DEFAULT_GRAD_SAMPLE_MODE", "DP_RECIPE", "DPRecipe", "GRAD_SAMPLE_MODES", "MAX_NOISE_MULTIPLIER",
           "MODEL_FILE", "PREPROCESSING_FILE", "REPORT_FILE", "DPConfigError", "Preprocessing",
           "PrivacyReport", "RawFeatureModel", "UnsupportedLayersError", "accuracy", "as_tensors",
           "default_delta", "load", "load_state_dict", "make_private",
           "prepare_model", "privacy_engine", "run_epoch", "save", "train_non_private",
           "train_private", "train_private_distributed"]
