"""flatjax: flat-minima optimizers for JAX, in two forms.

* Optax form (this namespace): each factory wraps a ``loss_fn`` and returns an
  ``optax.GradientTransformationExtraArgs`` whose updates are a descent direction for the optimizer
  chained after it: ``optax.chain(flatjax.sam(loss_fn, 0.05), optax.sgd(0.1))``.
* Estimator form (:mod:`flatjax.estimators`): the same methods as a drop-in for
  ``jax.value_and_grad`` in any training loop (Flax NNX ``nnx.Optimizer``, Linen ``TrainState``, plain
  Optax): ``(loss, aux), grads, est_state, info = est.value_and_grad(params, est_state, batch)``.

Methods:

* :func:`sam`, :func:`asam` — Foret et al. 2021; Kwon et al. 2021.
* :func:`rwp`, :func:`arwp`, :func:`mrwp`, :func:`marwp` — Li et al., TMLR 2024.
* :func:`wpsgd`, :func:`nso` — Zhang et al., TMLR 2024.
* :func:`crsam` — Wu et al., AAAI 2024.
* :func:`lets` — learns the radius of SAM/ASAM/CR-SAM (Wang et al., ECML-PKDD 2024).

Sub-packages imported on demand: ``flatjax.sharpness`` (measurement), ``flatjax.models`` and
``flatjax.data`` (need the ``experiments`` extra).
"""

from flatjax import estimators
from flatjax.core import ShardMapProbes, StepInfo, cosine_increasing, step_info
from flatjax.core.transform import optax_form
from flatjax.guard import skip_nonfinite
from flatjax.hyperparams import inject_hyperparams
from flatjax.methods import lets_radius_optimizer, lets_transformation

sam = optax_form(estimators.sam)
asam = optax_form(estimators.asam)
rwp = optax_form(estimators.rwp)
arwp = optax_form(estimators.arwp)
mrwp = optax_form(estimators.mrwp)
marwp = optax_form(estimators.marwp)
wpsgd = optax_form(estimators.wpsgd)
nso = optax_form(estimators.nso)
crsam = optax_form(estimators.crsam)
lets = optax_form(estimators.lets, adapter=lets_transformation)

__version__ = "0.1.0"

__all__ = [
    "ShardMapProbes",
    "StepInfo",
    "arwp",
    "asam",
    "cosine_increasing",
    "crsam",
    "estimators",
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
