"""One module per paper family; each factory returns an ``optax.GradientTransformationExtraArgs``."""

from flatjax.methods.crsam import crsam
from flatjax.methods.lets import LetsState, lets, lets_radius_optimizer
from flatjax.methods.nso import nso, wpsgd
from flatjax.methods.rwp import arwp, marwp, mrwp, rwp
from flatjax.methods.sam import asam, sam
