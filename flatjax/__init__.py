"""flatjax: flat-minima optimizers as Optax gradient transformations.

Methods (each wraps a ``loss_fn`` and returns an ``optax.GradientTransformationExtraArgs`` whose
updates are a descent direction for the optimizer chained after it):

* :func:`sam`, :func:`asam` — Foret et al. 2021; Kwon et al. 2021.
* :func:`rwp`, :func:`arwp`, :func:`mrwp`, :func:`marwp` — Li et al., TMLR 2024.
* :func:`wpsgd`, :func:`nso` — Zhang et al., TMLR 2024.
* :func:`crsam` — Wu et al., AAAI 2024.
* :func:`lets` — learns the radius of SAM/ASAM/CR-SAM (Wang et al., ECML-PKDD 2024).

Sub-packages imported on demand: ``flatjax.sharpness`` (measurement), ``flatjax.models`` and
``flatjax.data`` (need the ``experiments`` extra).
"""

from flatjax.core import ShardMapProbes, StepInfo, cosine_increasing, step_info
from flatjax.guard import skip_nonfinite
from flatjax.hyperparams import inject_hyperparams
from flatjax.methods import arwp, asam, crsam, lets, lets_radius_optimizer, marwp, mrwp, nso, rwp, sam, wpsgd

__version__ = "0.1.0"

__all__ = [
    "ShardMapProbes",
    "StepInfo",
    "arwp",
    "asam",
    "cosine_increasing",
    "crsam",
    "inject_hyperparams",
    "lets",
    "lets_radius_optimizer",
    "marwp",
    "mrwp",
    "nso",
    "rwp",
    "sam",
    "skip_nonfinite",
    "step_info",
    "wpsgd",
]
