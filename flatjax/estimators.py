"""Every flatjax method in estimator form: a drop-in for ``jax.value_and_grad`` in your own loop.

::

    est = flatjax.estimators.marwp(loss_fn, sigma=0.015, lam=0.5, has_aux=True)
    est_state = est.init(params)

    @jax.jit
    def train_step(params, opt_state, est_state, batch):
        (loss, aux), grads, est_state, info = est.value_and_grad(params, est_state, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)   # any Optax optimizer
        return optax.apply_updates(params, updates), opt_state, est_state, loss

The returned ``grads`` are the method's descent direction; ``aux`` (e.g. Flax BatchNorm statistics) and
``info`` (probe losses, diagnostics) are returned, not stored. Each factory takes the same arguments as
its Optax form (``flatjax.sam`` ...) without ``aux_init``. :func:`sgd` is plain ``jax.value_and_grad``
in the same contract. The contract: :mod:`flatjax.core.estimator`.
"""

from flatjax.core.estimator import Estimator, EstimatorState, Info
from flatjax.core.estimator import gradient as sgd
from flatjax.methods.lets import LetsEstimatorState
from flatjax.registry import METHODS

globals().update({name: method.estimator for name, method in METHODS.items()})

__all__ = ["Estimator", "EstimatorState", "Info", "LetsEstimatorState", "sgd", *METHODS]
