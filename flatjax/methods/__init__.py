"""One module per paper family; each factory returns the method's :class:`~flatjax.core.estimator.Estimator`.

The list of methods is :mod:`flatjax.registry`; the Optax forms (``flatjax.sam`` ...) are built from it.
"""

from flatjax.methods.lets import LetsEstimatorState, LetsState, lets_radius_optimizer, lets_transformation
