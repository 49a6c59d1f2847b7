"""Training configurations as code for ``python -m experiments.train --config NAME``.

One :class:`TrainConfig` per row of the seed papers' CIFAR tables whose settings the papers and
their official code pin down (``docs/algorithms.md`` lists each method's defaults), plus ``digits_*``
configs that run offline in seconds. Each paper config names its source; values marked ``(verify)``
are not fixed by the papers and follow the closest official setup.

Conventions shared by every config:

* base optimizer ``optax.chain(add_decayed_weights(weight_decay), sgd(lr_t, momentum))``
  — coupled L2 weight decay on all leaves, as torch's ``SGD(weight_decay=...)``;
* ``lr_t`` cosine from ``lr`` to 0 over all updates (per step; per epoch where ``lr_per_epoch``, as
  the official m-RWP/m-ARWP code);
* ``epochs`` counts passes over the training data; a method with ``two_batches``
  (m-RWP/m-ARWP as in the official code) consumes two batches per update, so its
  configs double the epochs to keep the number of updates of the nominal run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flatjax import registry

#: The CLI's ``--method`` choices: ``sgd`` (the base optimizer alone) and every method of
#: :data:`flatjax.registry.METHODS`, in its order.
BASELINE = "sgd"
METHODS = (BASELINE, *registry.METHODS)
#: Methods reading a second mini-batch as ``perturbed_batch`` (m-RWP/m-ARWP's B1); their paper configs
#: feed two consecutive batches per update (``two_batches``).
TWO_BATCH_METHODS = tuple(n for n, m in registry.METHODS.items() if m.second_batch == "perturbed_batch")
#: Methods reading a validation batch (LETS), which the CLI draws from an independently shuffled stream of
#: the training set; they wrap the base optimizer (``registry.Method.wraps_optimizer``).
LETS_METHODS = tuple(n for n, m in registry.METHODS.items() if m.second_batch == "val_batch")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    Attributes:
      name: registry key.
      dataset: ``digits`` | ``cifar10-folder`` | ``cifar10`` | ``cifar100`` (the last two via TFDS).
      model: a :func:`flatjax.models.create` name.
      method: one of :data:`METHODS` (``sgd`` = the base optimizer alone).
      method_kwargs: keyword arguments of the method's estimator factory (ρ, σ, λ, η, β, α, k, LETS's
        ``inner`` ...).
      sigma_increase: if set, σ follows ``flatjax.cosine_increasing(sigma, sigma_increase, T)``
        (RWP/ARWP's schedule); ``method_kwargs["sigma"]`` is then σ₀.
      two_batches: feed two consecutive batches per update (``batch``, ``perturbed_batch``).
      epochs, batch_size, lr, momentum, weight_decay: base optimizer settings.
      augment: ``cifar_transforms`` augmentation (CIFAR only).
      label_smoothing: label smoothing of the cross-entropy.
      lr_per_epoch: the cosine learning rate changes once per epoch instead of every update.
      model_kwargs: extra :func:`flatjax.models.create` options.
      source: where the hyper-parameters come from.
    """

    name: str
    dataset: str
    model: str
    method: str
    method_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    sigma_increase: float | None = None
    two_batches: bool = False
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "basic"
    label_smoothing: float = 0.0
    lr_per_epoch: bool = False
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


CONFIGS: dict[str, TrainConfig] = {}


def _add(cfg: TrainConfig) -> None:
    if cfg.name in CONFIGS:
        raise ValueError(f"duplicate config {cfg.name}")
    CONFIGS[cfg.name] = cfg


# ---- RWP paper (Li et al., TMLR 2024; official code nblt/mARWP, scripts/run_rwp.sh, run_mrwp.sh) ----
# Base: SGD lr 0.1, momentum 0.9, coupled wd 1e-3, batch 256, 200 epochs, cosine lr, Cutout on CNNs.
_RWP_BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=256, epochs=200, augment="cutout")
_C = {"cifar10": 10, "cifar100": 100}
for _data in ("cifar10", "cifar100"):
    for _model, _tag in (("resnet18", "resnet18"), ("vgg16_bn", "vgg16bn"), ("wrn28_10", "wrn28_10")):
        # SAM baseline of the RWP paper's tables, ρ grid-searched there (the RWP paper's SAM rows).
        _rho = {("cifar10", "resnet18"): 0.1, ("cifar10", "vgg16_bn"): 0.05, ("cifar10", "wrn28_10"): 0.1,
                ("cifar100", "resnet18"): 0.2, ("cifar100", "vgg16_bn"): 0.1,
                ("cifar100", "wrn28_10"): 0.2}[(_data, _model)]
        _add(TrainConfig(f"{_data}_{_tag}_sam", _data, _model, "sam", {"rho": _rho},
                         source="RWP paper SAM baseline, rho grid-searched there", **_RWP_BASE))
        _add(TrainConfig(f"{_data}_{_tag}_sgd", _data, _model, "sgd",
                         source="RWP paper SGD baseline (official scripts' base optimizer)", **_RWP_BASE))
        # RWP/ARWP: 1x loop, sigma cosine-increasing 0.001 -> 0.011 (official train_rwp_cos.py script;
        # the paper's tables quote sigma = 0.01), eta 0.1, beta 0.99.
        _add(TrainConfig(f"{_data}_{_tag}_rwp", _data, _model, "rwp", {"sigma": 0.001}, sigma_increase=10.0,
                         source="RWP paper, official run_rwp.sh (ARWP with eta=0)", **_RWP_BASE))
        _add(TrainConfig(f"{_data}_{_tag}_arwp", _data, _model, "arwp",
                         {"sigma": 0.001, "eta": 0.1, "beta": 0.99}, sigma_increase=10.0,
                         source="RWP paper, official run_rwp.sh / train_rwp_cos.py", **_RWP_BASE))
        # m-RWP/m-ARWP: constant sigma 0.015, lambda 0.5, two consecutive batches, epochs doubled
        # (official train_marwp.py: args.epochs *= 2), with the official epoch-wise cosine learning rate.
        _mbase = {**_RWP_BASE, "epochs": 400, "lr_per_epoch": True}
        _add(TrainConfig(f"{_data}_{_tag}_mrwp", _data, _model, "mrwp", {"sigma": 0.015, "lam": 0.5},
                         two_batches=True, source="RWP paper, official run_mrwp.sh (eta=0)", **_mbase))
        _add(TrainConfig(f"{_data}_{_tag}_marwp", _data, _model, "marwp",
                         {"sigma": 0.015, "lam": 0.5, "eta": 0.1, "beta": 0.99}, two_batches=True,
                         source="RWP paper, official run_mrwp.sh / train_marwp.py", **_mbase))

# ---- ASAM (Kwon et al. 2021) — LETS-ASAM baseline. rho 0.5 / 1.0, eta 0.01 (ASAM paper); base as the
# ASAM paper's CIFAR runs: lr 0.1, batch 128, wd 5e-4, 200 epochs (verify).
for _data, _rho in (("cifar10", 0.5), ("cifar100", 1.0)):
    _add(TrainConfig(f"{_data}_resnet18_asam", _data, "resnet18", "asam", {"rho": _rho, "eta": 0.01},
                     lr=0.1, batch_size=128, weight_decay=5e-4, epochs=200,
                     source="ASAM, Kwon et al. 2021 (rho, eta from the paper; base optimizer verify)"))

# ---- CR-SAM (Wu et al., AAAI 2024, Table 4 = official code defaults): lr 0.05 cosine, momentum 0.9,
# batch 128, wd 5e-3 (1e-3 for WRN), 200 epochs; code form of the direction.
for _data, _rho, _alpha in (("cifar10", 0.10, 0.1), ("cifar100", 0.15, 0.5)):
    _add(TrainConfig(f"{_data}_resnet18_crsam", _data, "resnet18", "crsam",
                     {"rho": _rho, "alpha": _alpha, "beta": 0.01}, lr=0.05, batch_size=128,
                     weight_decay=5e-3, epochs=200, source="CR-SAM paper Table 4 (ResNet-18)"))
    _add(TrainConfig(f"{_data}_wrn28_10_crsam", _data, "wrn28_10", "crsam",
                     {"rho": _rho, "alpha": 0.5, "beta": 0.1}, lr=0.05, batch_size=128,
                     weight_decay=1e-3, epochs=200, source="CR-SAM paper Table 4 (WRN-28-10)"))

# ---- NSO / WP-SGD (Zhang et al., TMLR 2024): sigma 0.01, k 1, lambda_c 0 (official scripts). The paper
# fine-tunes pretrained ResNet-34 with Adam; there is no from-scratch ResNet-18 row, so these use the RWP
# paper's from-scratch base optimizer to compare with its tables (verify).
for _data in ("cifar10", "cifar100"):
    _add(TrainConfig(f"{_data}_resnet18_nso", _data, "resnet18", "nso", {"sigma": 0.01, "lam": 0.0, "k": 1},
                     source="NSO official scripts (sigma, k, lambda); base: RWP paper setup (verify)",
                     **_RWP_BASE))
    _add(TrainConfig(f"{_data}_resnet18_wpsgd", _data, "resnet18", "wpsgd", {"sigma": 0.01, "k": 1},
                     source="NSO paper WP-SGD baseline; base: RWP paper setup (verify)", **_RWP_BASE))

# ---- LETS (Wang et al., ECML-PKDD 2024): LETS-SAM / LETS-ASAM learn the radius from its initial value (rho
# below: SAM's 0.05, ASAM's 0.5 / 1.0 as in the ASAM rows). No official code; base optimizer as the SAM papers'
# CIFAR runs (lr 0.1, batch 128, wd 5e-4, 200 epochs) (verify); radius optimizer: flatjax's default Adam.
for _data, _asam_rho in (("cifar10", 0.5), ("cifar100", 1.0)):
    for _model, _tag in (("resnet18", "resnet18"), ("wrn28_10", "wrn28_10")):
        _add(TrainConfig(f"{_data}_{_tag}_lets", _data, _model, "lets", {"rho": 0.05},
                         lr=0.1, batch_size=128, weight_decay=5e-4, epochs=200,
                         source="LETS-SAM, Wang et al. 2024 (initial rho = SAM's; base optimizer verify)"))
        _add(TrainConfig(f"{_data}_{_tag}_lets_asam", _data, _model, "lets",
                         {"inner": "asam", "rho": _asam_rho, "eta": 0.01},
                         lr=0.1, batch_size=128, weight_decay=5e-4, epochs=200,
                         source="LETS-ASAM, Wang et al. 2024 (initial rho = ASAM's; base optimizer verify)"))

# ---- Offline digits configs (scikit-learn 8x8 digits, MLP 64-128-128-10): quick sanity runs with each
# method at its paper default; sigma of the RWP family as in experiments/quickstart.py (digits-scaled).
# Every method of the registry gets one: the entries below where the papers give defaults, else the
# factory's own defaults. Keys are the config names' suffixes (``digits_mlp_<key>``); "method" defaults to
# the key.
_DIGITS = dict(dataset="digits", model="mlp", epochs=10, batch_size=64, lr=0.05, momentum=0.9,
               weight_decay=5e-4, augment="none", source="offline sanity run (not a paper row)")
_DIGITS_METHODS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sam": {"method_kwargs": {"rho": 0.05}},
    "asam": {"method_kwargs": {"rho": 0.5, "eta": 0.01}},
    "rwp": {"method_kwargs": {"sigma": 0.001}, "sigma_increase": 10.0},
    "arwp": {"method_kwargs": {"sigma": 0.001, "eta": 0.1, "beta": 0.99}, "sigma_increase": 10.0},
    "mrwp": {"method_kwargs": {"sigma": 0.015, "lam": 0.5}, "two_batches": True, "epochs": 20},
    "marwp": {"method_kwargs": {"sigma": 0.015, "lam": 0.5, "eta": 0.1, "beta": 0.99}, "two_batches": True,
              "epochs": 20},
    "wpsgd": {"method_kwargs": {"sigma": 0.01, "k": 1}},
    "nso": {"method_kwargs": {"sigma": 0.01, "lam": 0.0, "k": 1}},
    "crsam": {"method_kwargs": {"rho": 0.1, "alpha": 0.1, "beta": 0.01}},
    "lets": {"method_kwargs": {"rho": 0.05}},
    "lets_asam": {"method": "lets", "method_kwargs": {"inner": "asam", "rho": 0.5, "eta": 0.01}},
    # SAM-ON perturbs only normalization layers (and raises without any): the MLP with LayerNorms
    "samon": {"model_kwargs": {"norm": True}},
}
for _m in METHODS:
    _DIGITS_METHODS.setdefault(_m, {})
#: The no-argument sweep of ``python -m experiments.train``: the suffixes of the ``digits_mlp_*`` configs
#: (every method, plus LETS-ASAM), in the order of :data:`METHODS`.
DEFAULT_SWEEP = tuple(v for _m in METHODS for v, kw in _DIGITS_METHODS.items() if kw.get("method", v) == _m)
for _m in DEFAULT_SWEEP:
    _add(TrainConfig(f"digits_mlp_{_m}", **{"method": _m, **_DIGITS, **_DIGITS_METHODS[_m]}))


def get_config(name: str) -> TrainConfig:
    """Returns the config called ``name``.

    Raises:
      KeyError: with the list of known names, for an unknown ``name``.
    """
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(
            f"unknown config {name!r}; known configs: {', '.join(sorted(CONFIGS))} "
            "(python -m experiments.train --list-configs)"
        ) from None


def default_config(variant: str, dataset: str = "digits") -> TrainConfig:
    """The config used when only ``--method`` (and maybe ``--dataset``) is given: ``digits_mlp_<variant>``,
    or the ResNet-18 paper config ``<dataset>_resnet18_<variant>`` (``variant``: a method, or another
    suffix of :data:`DEFAULT_SWEEP` such as ``lets_asam``).

    Raises:
      KeyError: naming the missing config.
    """
    if f"digits_mlp_{variant}" not in CONFIGS:
        raise KeyError(f"unknown method {variant!r}; choose from {', '.join(METHODS)}")
    if dataset == "digits":
        return CONFIGS[f"digits_mlp_{variant}"]
    data = "cifar10" if dataset == "cifar10-folder" else dataset
    paper = CONFIGS.get(f"{data}_resnet18_{variant}")
    if paper is None:
        raise KeyError(f"no {data} config for {variant!r} (no config {data}_resnet18_{variant}); pass --config")
    return paper.replace(dataset=dataset)


def default_sweep(dataset: str = "digits") -> list[TrainConfig]:
    """The configs of :data:`DEFAULT_SWEEP` on ``dataset`` (off digits: those with a ResNet-18 paper config)."""
    data = "cifar10" if dataset == "cifar10-folder" else dataset
    return [default_config(v, dataset) for v in DEFAULT_SWEEP
            if dataset == "digits" or f"{data}_resnet18_{v}" in CONFIGS]


def with_method(cfg: TrainConfig, method: str) -> TrainConfig:
    """``cfg`` run with ``method`` instead (``--config C --method M``), with M's own hyper-parameters: its
    config for the same dataset and model when there is one, else its digits defaults (a sam config's rho
    must not reach rwp)."""
    variant = next((v for v in sorted(DEFAULT_SWEEP, key=len, reverse=True) if cfg.name.endswith(f"_{v}")), None)
    prefix = cfg.name[: -len(variant) - 1] if variant else cfg.name
    donor = CONFIGS.get(f"{prefix}_{method}", default_config(method))
    model_kwargs = {**cfg.model_kwargs, **donor.model_kwargs} if donor.model == cfg.model else cfg.model_kwargs
    return dataclasses.replace(  # not .replace: a None sigma_increase must replace the config's own
        cfg, method=method, name=f"{cfg.name}+{method}", method_kwargs=donor.method_kwargs,
        sigma_increase=donor.sigma_increase, two_batches=donor.two_batches, lr_per_epoch=donor.lr_per_epoch,
        model_kwargs=model_kwargs)
