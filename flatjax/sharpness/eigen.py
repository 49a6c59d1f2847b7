"""Top Hessian eigenvalues: power iteration with deflation, and the Lanczos method.

* :func:`power_iteration` (as in PyHessian, Yao et al. 2020): for each of the ``k`` eigenpairs,
  iterate ``v <- H v / ||H v||`` while projecting out the eigenvectors already found (deflation);
  the eigenvalue is the Rayleigh quotient ``vᵀHv``. It converges to the eigenvalues of largest
  **magnitude**, at a rate set by the ratio of consecutive magnitudes.
* :func:`lanczos_eigenvalues` (Lanczos 1950): ``m`` HVPs build an orthonormal Krylov basis ``V`` and
  a tridiagonal ``T = Vᵀ H V``; the Ritz values (eigenvalues of ``T``) approximate the extreme
  eigenvalues of ``H``, usually far faster than power iteration. The basis is kept and every new
  vector is re-orthogonalised against all previous ones (full reorthogonalisation, twice), which is
  needed for accurate results in float32 and at small sizes; memory is ``m × dim`` floats.

Note: NSO's published "top eigenvalue" normalises each layer separately (a block iteration); the
values here are those of the full Hessian of the (dataset) loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.validate import check_choice, check_key, check_nonnegative, check_positive_int, invalid
from .common import Batch, progress
from .hvp import HessianOperator, LossFn, Params, as_operator
from .trace import probe_vectors


class EigenResult(NamedTuple):
    """Result of :func:`power_iteration` and :func:`lanczos_eigenvalues`."""

    eigenvalues: np.ndarray
    """The ``k`` eigenvalue estimates, float64, ordered as documented by the function."""
    eigenvectors: list | None
    """Unit eigenvector estimates as pytrees shaped like ``params`` (if requested), else None."""
    num_hvps: int
    """Hessian-vector products spent."""
    residuals: np.ndarray
    """``||H v - λ v||`` for each pair (power iteration: measured; Lanczos: the Ritz bound
    ``|β_m s_{m,i}|``)."""
    converged: bool
    """Power iteration: all pairs met ``tol``; Lanczos: every residual <= tol · max|λ|."""


class Tridiagonal(NamedTuple):
    """Output of :func:`lanczos_tridiagonal`: ``T = tridiag(betas, alphas, betas)``."""

    alphas: np.ndarray
    """Diagonal of ``T`` (length ``m``; ``m`` may be below ``num_iters`` after breakdown)."""
    betas: np.ndarray
    """Off-diagonal of ``T`` (length ``m - 1``)."""
    last_beta: float
    """Norm of the residual after the last step (0 after an exact breakdown)."""
    basis: jax.Array | None
    """The Krylov basis ``V`` of shape ``(m, dim)`` if requested, else None."""

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors ``S`` of ``T`` (columns)."""
        m = self.alphas.size
        t = np.diag(self.alphas)
        if m > 1:
            t += np.diag(self.betas, 1) + np.diag(self.betas, -1)
        return np.linalg.eigh(t)


@functools.partial(jax.jit, static_argnums=(6,), donate_argnums=(0,))
def _lanczos_update(basis, j, v, v_prev, w, beta_prev, reorth: bool):
    """One Lanczos three-term step after ``w = H v_j``; returns the new row ``j+1`` of the basis."""
    alpha = jnp.vdot(v, w)
    w = w - alpha * v - beta_prev * v_prev
    if reorth:  # classical Gram-Schmidt against all stored rows, twice ("twice is enough")
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
    beta = jnp.linalg.norm(w)
    v_next = w / jnp.where(beta > 0, beta, 1.0)
    basis = basis.at[j + 1].set(v_next, mode="drop")
    return basis, alpha, beta, v_next


def lanczos_tridiagonal(
    matvec: Callable[[jax.Array], jax.Array],
    v0: jax.Array,
    num_iters: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = False,
    progress_bar: bool = False,
) -> Tridiagonal:
    """Run ``num_iters`` Lanczos steps (Lanczos 1950) for a symmetric linear operator.

    Args:
      matvec: ``v -> H v`` on flat vectors (e.g. :meth:`HessianOperator.matvec`).
      v0: starting vector (normalised here).
      num_iters: Krylov dimension ``m``; capped at ``len(v0)``. Stops earlier on breakdown
        (``β`` below ``100·eps·max(|α|, β)``: an invariant subspace was found, the Ritz values are
        then exact eigenvalues of ``H``).
      reorthogonalize: full reorthogonalisation against the stored basis (recommended).
      keep_basis: return the basis ``V`` (needed for Ritz vectors).
      progress_bar: show a tqdm bar.

    Returns:
      :class:`Tridiagonal` with ``T = Vᵀ H V``.
    """
    v0 = jnp.asarray(v0)
    if v0.ndim != 1 or v0.size == 0:
        raise invalid("v0", "a non-empty flat vector", v0.shape)
    dim = v0.size
    num_iters = min(check_positive_int("num_iters", num_iters), dim)
    nrm = jnp.linalg.norm(v0)
    if not float(nrm) > 0:
        raise invalid("v0", "a non-zero vector", "zero vector")
    v = v0 / nrm
    eps = float(jnp.finfo(v.dtype).eps)
    # Without reorthogonalisation and without keep_basis the basis is not needed: 1-row dummy.
    rows = num_iters if (reorthogonalize or keep_basis) else 1
    basis = jnp.zeros((rows, dim), v.dtype).at[0].set(v)
    v_prev = jnp.zeros_like(v)
    beta_prev = jnp.zeros((), v.dtype)
    alphas, betas = [], []
    last_beta, scale = 0.0, 0.0
    for j in progress(range(num_iters), progress_bar, "Lanczos", num_iters):
        w = matvec(v)
        idx = j if rows > 1 else 0  # with a 1-row buffer, row j + 1 = 1 is out of range: dropped
        basis, alpha, beta, v_next = _lanczos_update(basis, idx, v, v_prev, w, beta_prev,
                                                     bool(reorthogonalize))
        a, b = float(alpha), float(beta)
        alphas.append(a)
        scale = max(scale, abs(a), b)
        last_beta = b
        if j == num_iters - 1 or b <= 100 * eps * scale:
            break
        betas.append(b)
        v_prev, v, beta_prev = v, v_next, beta
    m = len(alphas)
    keep = basis[:m] if keep_basis else None
    return Tridiagonal(np.asarray(alphas), np.asarray(betas), float(last_beta), keep)


def _start_vector(key: jax.Array, dim: int, dtype) -> jax.Array:
    v = probe_vectors(key, (dim,), "gaussian", dtype)
    return v / jnp.linalg.norm(v)


def lanczos_eigenvalues(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    k: int = 1,
    num_iters: int = 100,
    which: str = "largest",
    tol: float = 1e-3,
    return_vectors: bool = False,
    progress_bar: bool = False,
) -> EigenResult:
    """Extreme eigenvalues of ``∇²L(params)`` by the Lanczos method with full reorthogonalisation.

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      key: random key for the starting vector (same key, same result).
      k: number of eigenvalues (1 <= k <= num_iters).
      num_iters: Lanczos steps = HVPs (capped at the number of parameters, where the result is
        exact up to rounding). 100 is plenty for a few top eigenvalues of a large network.
      which: ``"largest"`` (algebraically largest, descending; default), ``"smallest"``
        (ascending) or ``"magnitude"`` (largest ``|λ|``, descending by ``|λ|``).
      tol: ``converged`` is True when every Ritz residual bound ``|β_m s_{m,i}|`` is at most
        ``tol · max|λ|`` (it does not change the number of steps).
      return_vectors: also return the Ritz vectors as pytrees (uses the stored basis).
      progress_bar: show a tqdm bar.

    Returns:
      :class:`EigenResult`.
    """
    key = check_key(key)
    k = check_positive_int("k", k)
    num_iters = check_positive_int("num_iters", num_iters, k)
    check_choice("which", which, ("largest", "smallest", "magnitude"))
    tol = check_nonnegative("tol", tol)
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    if k > op.dim:
        raise invalid("k", f"at most the number of parameters ({op.dim})", k)
    tri = lanczos_tridiagonal(op.matvec, _start_vector(key, op.dim, op.dtype), num_iters,
                              reorthogonalize=True, keep_basis=return_vectors,
                              progress_bar=progress_bar)
    theta, s = tri.eigh()
    if k > theta.size:
        raise invalid("k", f"at most the Krylov dimension reached ({theta.size}, after breakdown)", k)
    if which == "largest":
        order = np.argsort(-theta)[:k]
    elif which == "smallest":
        order = np.argsort(theta)[:k]
    else:
        order = np.argsort(-np.abs(theta))[:k]
    residuals = np.abs(tri.last_beta * s[-1, order])
    vectors = None
    if return_vectors:
        ritz = jnp.asarray(s[:, order].T, op.dtype) @ tri.basis
        vectors = [op.unravel(r) for r in ritz]
    scale = max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)
    return EigenResult(theta[order], vectors, int(tri.alphas.size), residuals,
                       bool(np.all(residuals <= tol * scale)))


@jax.jit
def _deflate_normalise(w, found):
    """Project ``w`` off the rows of ``found`` (twice) and normalise."""
    for _ in range(2):
        w = w - found.T @ (found @ w)
    n = jnp.linalg.norm(w)
    return w / jnp.where(n > 0, n, 1.0)


def power_iteration(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    k: int = 1,
    max_iters: int = 100,
    tol: float = 1e-4,
    return_vectors: bool = False,
    progress_bar: bool = False,
) -> EigenResult:
    """Top-``k`` eigenvalues (largest magnitude) by power iteration with deflation (PyHessian).

    For ``i = 1..k``: start from a random unit vector, repeat ``v <- P(Hv)/||P(Hv)||`` where ``P``
    projects out the ``i-1`` eigenvectors already found, until the Rayleigh quotient ``vᵀHv``
    changes by at most ``tol · |λ|`` between iterations, or ``max_iters``.

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      key: random key for the starting vectors (same key, same result).
      k: number of eigenpairs.
      max_iters: HVPs per eigenpair at most.
      tol: relative change of the Rayleigh quotient that stops an eigenpair (PyHessian: 1e-3).
        The eigenvalue error is roughly ``tol`` times ``λ/(λ-λ_next)``; prefer Lanczos when
        eigenvalues are close.
      return_vectors: also return the eigenvectors as pytrees.
      progress_bar: show a tqdm bar.

    Returns:
      :class:`EigenResult`, eigenvalues in the order found (normally decreasing ``|λ|``).
    """
    key = check_key(key)
    k = check_positive_int("k", k)
    max_iters = check_positive_int("max_iters", max_iters)
    tol = check_nonnegative("tol", tol)
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    if k > op.dim:
        raise invalid("k", f"at most the number of parameters ({op.dim})", k)
    found = jnp.zeros((k, op.dim), op.dtype)
    eigvals, residuals, total, all_conv = [], [], 0, True
    for i in range(k):
        v = _deflate_normalise(probe_vectors(jax.random.fold_in(key, i), (op.dim,), "gaussian",
                                             op.dtype), found)
        lam_prev, conv, lam, hv = None, False, 0.0, None
        for _ in progress(range(max_iters), progress_bar, f"power iteration {i + 1}/{k}",
                          max_iters):
            hv = op.matvec(v)
            total += 1
            lam = float(jnp.vdot(v, hv))
            if lam_prev is not None and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-30):
                conv = True
                break
            lam_prev = lam
            v = _deflate_normalise(hv, found)
        residuals.append(float(jnp.linalg.norm(hv - lam * v)))
        eigvals.append(lam)
        all_conv &= conv
        found = found.at[i].set(v)
    vectors = [op.unravel(found[i]) for i in range(k)] if return_vectors else None
    return EigenResult(np.asarray(eigvals), vectors, total, np.asarray(residuals), all_conv)
