"""One module per paper family; each factory returns the method's :class:`~flatjax.core.estimator.Estimator`.

The Optax forms (``flatjax.sam`` ...) are built from these in :mod:`flatjax`.
"""

from flatjax.methods.crsam import crsam
from flatjax.methods.lets import LetsEstimatorState, LetsState, lets, lets_radius_optimizer, lets_transformation
from flatjax.methods.nso import nso, wpsgd
from flatjax.methods.rwp import arwp, marwp, mrwp, rwp
from flatjax.methods.sam import asam, sam
