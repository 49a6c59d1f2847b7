"""The shared machinery: the transformation contract, perturbation rules, probe evaluation."""

from flatjax.core.evaluate import Evaluator, Probes, ShardMapProbes, to_varying
from flatjax.core.schedule import cosine_increasing, value_at
from flatjax.core.transform import Direction, FlatState, StepContext, StepInfo, flat_transformation, step_info
