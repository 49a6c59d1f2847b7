"""The shared machinery: the estimator contract, its Optax form, perturbation rules, probe evaluation."""

from flatjax.core.estimator import Direction, Estimator, EstimatorState, Info, StepContext, rule_estimator
from flatjax.core.evaluate import Evaluator, Probes, ShardMapProbes, to_varying
from flatjax.core.schedule import cosine_increasing, value_at
from flatjax.core.transform import FlatState, StepInfo, as_transformation, optax_form, step_info
