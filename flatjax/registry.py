"""The one list of flatjax methods. Everything else is derived from it: the Optax forms (``flatjax.sam``
...), the estimator namespace, ``flatjax.inject_hyperparams``' static arguments, the training CLI's
``--method`` choices and the protocol test matrix.

Adding a method: write its estimator factory in one file under ``flatjax/methods/`` (a direction rule
given to :func:`flatjax.core.rule_estimator`; see ``docs/algorithms.md``, "Writing a method"), add its
tests, and add ONE line to :data:`METHODS` below.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from flatjax.core.estimator import Estimator
from flatjax.core.transform import as_transformation


@dataclasses.dataclass(frozen=True)
class Method:
    """What tools need to know about a method.

    Attributes:
      factory: ``"module.function"`` of the estimator factory under ``flatjax.methods`` (e.g.
        ``"rwp.marwp"``); the function's name is the method's name.
      paper: the reference, for tables and docs.
      hyperparameters: the schedulable numeric arguments (``inject_hyperparams`` traces exactly these;
        every other argument is kept static). The first is the one protocol tests vary.
      passes: gradient passes per step at the defaults (the papers' cost column).
      seeded: the method draws noise from ``seed=``.
      second_batch: the ``update`` keyword of a second mini-batch the method reads, if any
        (``"perturbed_batch"``: m-(A)RWP's B1; ``"val_batch"``: LETS's validation batch, required).
      parallel_passes: the method has independent passes that probe strategies can run together.
      adapter: ``"module.function"`` building the Optax form from the estimator; None:
        ``flatjax.core.as_transformation`` (LETS wraps the base optimizer instead).
    """

    factory: str
    paper: str
    hyperparameters: tuple[str, ...]
    passes: str
    seeded: bool = False
    second_batch: str | None = None
    parallel_passes: bool = False
    adapter: str | None = None

    @property
    def name(self) -> str:
        return self.factory.rsplit(".", 1)[1]

    @property
    def estimator(self) -> Callable[..., Estimator]:
        """The estimator factory."""
        return _resolve(self.factory)

    @property
    def optax_adapter(self) -> Callable[..., Any]:
        """Builds the Optax form from an estimator (``adapter``, default ``as_transformation``)."""
        return as_transformation if self.adapter is None else _resolve(self.adapter)

    @property
    def wraps_optimizer(self) -> bool:
        """The Optax form contains the base optimizer (its updates are final), as LETS does."""
        return self.adapter is not None


def _resolve(path: str) -> Callable[..., Any]:
    module, function = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"flatjax.methods.{module}"), function)


_RWP = "Li et al., Revisiting Random Weight Perturbation, TMLR 2024"
_NSO = "Zhang et al., Noise Stability Optimization, TMLR 2024"

#: Every method, in the order tables list them.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sam.sam", "Foret et al., Sharpness-Aware Minimization, ICLR 2021", ("rho",), "2"),
    Method("sam.asam", "Kwon et al., ASAM, ICML 2021", ("rho", "eta"), "2"),
    Method("rwp.rwp", _RWP, ("sigma",), "1", seeded=True),
    Method("rwp.arwp", _RWP, ("sigma", "eta", "beta"), "1", seeded=True),
    Method("rwp.mrwp", _RWP, ("lam", "sigma"), "2 independent", seeded=True, second_batch="perturbed_batch",
           parallel_passes=True),
    Method("rwp.marwp", _RWP, ("lam", "sigma", "eta", "beta"), "2 independent", seeded=True,
           second_batch="perturbed_batch", parallel_passes=True),
    Method("nso.wpsgd", _NSO, ("sigma",), "k independent", seeded=True, parallel_passes=True),
    Method("nso.nso", _NSO, ("sigma", "lam"), "2k independent (+1 clean if needed)", seeded=True,
           parallel_passes=True),
    Method("crsam.crsam", "Wu et al., CR-SAM, AAAI 2024", ("alpha", "rho", "beta"), "1 + 2 independent",
           parallel_passes=True),
    Method("lets.lets", "Wang et al., LETS, ECML-PKDD 2024", ("eta", "crsam_alpha", "crsam_beta"),
           "inner + 2 + HVP", second_batch="val_batch", adapter="lets.lets_transformation"),
    Method("gsam.gsam", "Zhuang et al., Surrogate Gap Guided SAM, ICLR 2022", ("rho", "alpha"), "2"),
    Method("samon.samon", "Mueller et al., Normalization Layers Are All That SAM Needs, NeurIPS 2023", ("rho",), "2"),
)}


def get(name: str) -> Method:
    """The :class:`Method` called ``name``; ``ValueError`` listing the methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; flatjax has {', '.join(METHODS)}")
    return METHODS[name]
