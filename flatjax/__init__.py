"""flatjax: flat-minima optimizers as Optax gradient transformations.

Methods (each wraps a ``loss_fn`` and returns an ``optax.GradientTransformationExtraArgs`` whose
updates are a descent direction for the optimizer chained after it):

* :func:`sam`, :func:`asam` — Foret et al. 2021; Kwon et al. 2021.
* :func:`rwp`, :func:`arwp`, :func:`mrwp`, :func:`marwp` — Li et al., TMLR 2024.

Sub-packages imported on demand: ``flatjax.sharpness`` (measurement), ``flatjax.models`` and
``flatjax.data`` (need the ``experiments`` extra).
"""

from flatjax.core import ShardMapProbes, StepInfo, cosine_increasing, step_info
from flatjax.guard import skip_nonfinite
from flatjax.hyperparams import inject_hyperparams
from flatjax.methods import arwp, asam, marwp, mrwp, rwp, sam

__version__ = "0.1.0"

__all__ = [
    "ShardMapProbes",
    "StepInfo",
    "arwp",
    "asam",
    "cosine_increasing",
    "inject_hyperparams",
    "marwp",
    "mrwp",
    "rwp",
    "sam",
    "skip_nonfinite",
    "step_info",
]
