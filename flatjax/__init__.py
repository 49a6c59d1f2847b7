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
* :func:`gsam` — surrogate-gap guided SAM (Zhuang et al., ICLR 2022).
* :func:`samon` — SAM perturbing only normalization layers (Mueller et al., NeurIPS 2023).

The list lives in :mod:`flatjax.registry`; new methods are written with :func:`flatjax.core.rule_estimator`.

Sub-packages imported on demand: ``flatjax.sharpness`` (measurement), ``flatjax.models`` and
``flatjax.data`` (need the ``experiments`` extra).
"""

from flatjax import estimators, registry
from flatjax.core import ShardMapProbes, StepInfo, cosine_increasing, step_info
from flatjax.core.transform import optax_form
from flatjax.guard import skip_nonfinite
from flatjax.hyperparams import inject_hyperparams
from flatjax.methods import lets_radius_optimizer

# the Optax form of every method in the registry: flatjax.sam, flatjax.marwp, ..., flatjax.lets
for _method in registry.METHODS.values():
    globals()[_method.name] = optax_form(_method.estimator, _method.optax_adapter)
del _method

__version__ = "0.1.0"

__all__ = ["ShardMapProbes", "StepInfo", "cosine_increasing", "estimators", "inject_hyperparams",
           "lets_radius_optimizer", "registry", "skip_nonfinite", "step_info", *registry.METHODS]
