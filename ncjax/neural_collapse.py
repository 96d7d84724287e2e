"""Neural collapse metrics NC1-NC4, overall and per subgroup (SPEC section 5).

Notation: features h_i (N x D), trained labels y_i in [0, K), groups g_i,
classifier W (K x D) and bias b (K); K is taken from W. mu_c are the class
means of the given features, or `centers` when given (e.g. train means for
test features); mu_G is their unweighted mean (Papyan, default) or the
sample mean sum_c pi_c mu_c; M has rows mu_c - mu_G.

  Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,  Sigma_B = M^T M / K
  nc1            Tr(Sigma_W Sigma_B^+) / K, Sigma_B^+ on the top K-1 eigenpairs
                 (K = 2: 2 d^T Sigma_W d / |d|^4, d = mu_0 - mu_1)
  nc1_trace      Tr Sigma_W / Tr Sigma_B
  nc1_cdnv       mean over c < c' of (v_c + v_c') / (2 |mu_c - mu_c'|^2),
                 v_c the mean squared distance of class c to mu_c
  nc1_dist       (1/N) sum_i |h_i - mu_{y_i}|  (paper eq. 1, not squared)
  nc2_*_{w,m}    on the rows of W and of M: equinorm std/mean of the norms;
                 equiangular std of the pairwise cosines; maxangle mean
                 |cos + 1/(K-1)|; etf |G/|G|_F - (I - 11^T/K)/sqrt(K-1)|_F,
                 G the Gram matrix; std with `ddof` (default 0)
  nc3            |W/|W|_F - M/|M|_F|_F^2 (Papyan; bias excluded, W not centred)
  nc3_wh         |W M^T/|W M^T|_F - (I - 11^T/K)/sqrt(K-1)|_F (blind for K=2)
  nc4            fraction of samples with argmax_c (W h + b)_c != argmin_c
                 |h - mu_c| (bias included; first index wins ties)
  nc1/g{a}       Tr(Sigma_W^a Sigma_B^+)/K, Sigma_W^a the group-a scatter around
                 the global mu_c (paper eq. 2-3), Sigma_B global
  nc1_dist/g{a}  (1/N_a) sum_{i in a} |h_i - mu_{y_i}|
  nc1_own/g{a}   nc1 of group a alone (its own class means, Sigma_W, Sigma_B)

For K = 2 the rows of M are antipodal, so every NC2 metric on M is exactly 0
(unweighted mu_G) or a constant set by the class priors (sample mu_G).

Undefined values are NaN, never a stand-in number: a class without samples
(and no `centers`), Sigma_B of rank < K-1 (e.g. coincident class means), a
group lacking a class (`nc1_own`; so always for a group of one sample), a
group without samples (kernels only), a zero-norm row in NC2, std with
ddof >= the number of values. The jitted kernels cannot raise: non-finite features give NaN
metrics, and rows whose label is outside [0, K) or group outside [0, G) are
padding, left out of everything. `compute` checks its input and raises
`DataError` instead.

How. Everything derives from per-(class, group) cells: count, mean, centred
second moments, and the sums of distances and NC4 mismatches. NC1 sees Sigma_W
only through the span of the means, so the in-memory kernel never forms a
D x D matrix: it projects each centred feature on the J + K vectors
{cell means, class centres} - mu_G (J = K*G cells), which span every direction
any variant needs, and keeps per-group P x P moments of the projections: two
passes over the rows, O(N D (J + 2K)). The streaming path cannot know the final
means while it reads, so it keeps the full D x D within-cell scatter per group
and merges batches with the parallel update of Chan, Golub & LeVeque (1982);
distances to the final means (nc1_dist, nc4) need a second pass. (A second
pass could also project instead; keeping the first self-sufficient lets a
loop measure NC1-NC3 in one pass and skip the second.)

Numerics. Rows are shifted by a reference point (the mean of the first rows)
and centred on their cell means before any product, so nothing is computed as
E[hh^T] - mu mu^T and float32 keeps its precision when the spread is tiny next
to the mean. Sums over rows (means, moments, distances) run in the accumulator
dtype: float64 when x64 is enabled, else float32. Products over D (projections,
logits, |h - m|^2) and the streaming path's per-chunk D x D scatter run in the
feature dtype with HIGHEST precision (never TF32/bf16); their rounding is
random across rows and averages out (float32 features agree with a float64
reference to ~2e-8 relative on the benchmark). `compute` and
`compute_streaming` enable x64 only inside their own call
(`jax.enable_x64(True)` as a context manager: jax >= 0.8, including 0.10 and
0.12; `jax.experimental.enable_x64` before), so the training program stays
float32; float64 features there take the exact float64 path.
`make_metrics_fn` follows whatever x64 setting its caller runs under.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ncjax.errors import ConfigError, DataError

_HI = lax.Precision.HIGHEST
GLOBAL_MEANS = ("unweighted", "sample")
DEFAULT_CHUNK = 2048  # rows per chunk: centred temporaries stay in cache
OVERALL_KEYS = (
    "nc1", "nc1_trace", "nc1_cdnv", "nc1_dist",
    "nc2_equinorm_w", "nc2_equiangular_w", "nc2_maxangle_w", "nc2_etf_w",
    "nc2_equinorm_m", "nc2_equiangular_m", "nc2_maxangle_m", "nc2_etf_m",
    "nc3", "nc3_wh", "nc4",
)  # fmt: skip
GROUP_KEYS = ("nc1", "nc1_dist", "nc1_own")

Array = jax.Array
Metrics = dict[str, Array]


def metric_names(group_ids: Iterable[Any] = ()) -> list[str]:
  """The keys `compute` returns, for the given group values."""
  return list(OVERALL_KEYS) + [f"{k}/g{a}" for a in group_ids for k in GROUP_KEYS]


def _acc_dtype() -> jnp.dtype:
  """float64 where the caller enabled x64, else float32."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _enable_x64():
  enable = getattr(jax, "enable_x64", None)
  if enable is None:  # jax < 0.8
    from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top

    return enable_x64()
  return enable(True)


# ----------------------------------------------------------------------------
# Row chunks.


def _scan_rows(body, carry, rows: Sequence[Array], chunk: int):
  """Folds `body(carry, *row_chunk) -> (carry, per_row)` over row chunks."""
  n = rows[0].shape[0]
  full, tail = divmod(n, chunk)
  outs = []
  if full:

    def step(c, i):
      return body(c, *(lax.dynamic_slice_in_dim(x, i * chunk, chunk) for x in rows))

    carry, ys = lax.scan(step, carry, jnp.arange(full))
    outs.append(jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), ys))
  if tail or not full:
    carry, ys = body(carry, *(x[full * chunk :] for x in rows))
    outs.append(ys)
  return carry, jax.tree.map(lambda *y: jnp.concatenate(y), *outs)


def _cells(labels, groups, k: int, g: int) -> Array:
  """Cell index y * G + g; J = K * G marks padding rows."""
  labels = jnp.asarray(labels).astype(jnp.int32)
  groups = jnp.zeros_like(labels) if groups is None else jnp.asarray(groups).astype(jnp.int32)
  ok = (labels >= 0) & (labels < k) & (groups >= 0) & (groups < g)
  return jnp.where(ok, labels * g + groups, k * g)


def _shift(feats, cells, num_cells: int, chunk: int) -> Array:
  """A reference point (mean of the first valid rows) subtracted from every row.

  It removes the common offset of the features, so that float32 sums and
  differences keep their precision when the spread is tiny next to the mean.
  """
  h, c = feats[:chunk], cells[:chunk]
  ok = (c < num_cells)[:, None]
  return jnp.sum(jnp.where(ok, h, 0), 0) / jnp.maximum(jnp.sum(ok), 1)


def _cell_means(feats, cells, shift, num_cells: int, chunk: int):
  """Counts (J,) and means (J x D, relative to `shift`, 0 if empty)."""
  acc = _acc_dtype()

  def body(tot, h, c):
    # Summed in the accumulator dtype: float32 sums of 2048 rows would leave
    # relative errors ~1e-7 in the means, which small metrics (nc3_wh) amplify.
    x = jnp.where((c < num_cells)[:, None], h.astype(acc) - shift.astype(acc), 0)
    return tot + jax.ops.segment_sum(x, c, num_cells + 1)[:num_cells], ()

  tot, _ = _scan_rows(body, jnp.zeros((num_cells, feats.shape[1]), acc), (feats, cells), chunk)
  count = jnp.bincount(cells, length=num_cells + 1)[:num_cells].astype(jnp.int32)
  # A NaN or inf in any valid row reaches its cell sum: a free check.
  return count, tot / jnp.maximum(count, 1).astype(acc)[:, None], ~jnp.all(jnp.isfinite(tot))


def _centred(h, c, shift, mean, num_cells: int):
  """Rows minus their cell mean (padding rows 0), in the feature dtype.

  Means are relative to the shift, so they are small and rounding them to the
  feature dtype loses nothing that matters; callers correct the remainder.
  """
  ok = (c < num_cells)[:, None]
  return jnp.where(ok, h - shift - mean.astype(h.dtype)[jnp.minimum(c, num_cells - 1)], 0)


# ----------------------------------------------------------------------------
# Geometry shared by both paths.


class _Geometry(NamedTuple):
  centres: Array  # K x D, relative to the shift
  mu_g: Array  # D
  basis: Array  # (J + K) x D: cell means and centres minus mu_G


def _geometry(count, mean, centres, k: int, g: int, global_mean: str) -> _Geometry:
  acc = mean.dtype
  n_kg = count.reshape(k, g).astype(acc)
  n_c = n_kg.sum(1)
  if centres is None:
    sums = jnp.einsum("kg,kgd->kd", n_kg, mean.reshape(k, g, -1), precision=_HI)
    centres = sums / n_c[:, None]  # NaN for a class without samples
  if global_mean == "unweighted":
    mu_g = centres.mean(0)
  else:
    mu_g = jnp.einsum("k,kd->d", n_c / n_c.sum(), centres, precision=_HI)
  # Any finite reference point gives a spanning set; mu_G (undefined when a
  # class is missing) makes the last K rows the rows of M.
  ref = jnp.where(jnp.isfinite(mu_g), mu_g, 0)
  cell_rows = jnp.where((count > 0)[:, None], mean - ref, 0)
  centre_rows = jnp.where(jnp.isfinite(centres), centres - ref, 0)
  return _Geometry(centres, mu_g, jnp.concatenate([cell_rows, centre_rows]))


def _nc1(x, gram) -> Array:
  """Sum_k u_k^T x u_k / lambda_k^2 over the top K-1 eigenpairs of `gram`.

  With gram = M M^T and x = M Sigma_W M^T this is Tr(Sigma_W Sigma_B^+)/K:
  v_k = M^T u_k / sqrt(lambda_k) are Sigma_B's eigenvectors, eigenvalues
  lambda_k / K. NaN when Sigma_B has rank < K-1.
  """
  k = gram.shape[0]
  finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(x))
  vals, vecs = jnp.linalg.eigh(jnp.where(finite, gram, jnp.eye(k, dtype=gram.dtype)))
  lam, u = vals[1:], vecs[:, 1:]
  q = jnp.einsum("ik,ij,jk->k", u, jnp.where(finite, x, 0), u, precision=_HI)
  tol = 64 * k * jnp.finfo(gram.dtype).eps * jnp.trace(gram)
  ok = finite & (lam[0] > tol)
  return jnp.where(ok, jnp.sum(q / jnp.where(ok, lam, 1) ** 2), jnp.nan)


def _etf_error(gram) -> Array:
  k = gram.shape[0]
  etf = (jnp.eye(k) - 1.0 / k) / jnp.sqrt(k - 1.0)
  return jnp.linalg.norm(gram / jnp.linalg.norm(gram) - etf)


def _nc2(v, ddof: int) -> dict[str, Array]:
  """Equinorm, equiangularity, max-angle and ETF-Gram error of rows of v."""
  k = v.shape[0]
  gram = jnp.matmul(v, v.T, precision=_HI)
  norms = jnp.sqrt(jnp.diag(gram))
  iu = np.triu_indices(k, 1)
  cos = (gram / jnp.outer(norms, norms))[iu]
  return {
      "equinorm": jnp.std(norms, ddof=ddof) / jnp.mean(norms),
      "equiangular": jnp.std(cos, ddof=ddof),
      "maxangle": jnp.mean(jnp.abs(cos + 1.0 / (k - 1))),
      "etf": _etf_error(gram),
  }


def _metrics(
    count, mean, sqdev, scatter, dist, mismatch, geo: _Geometry, w, *,
    global_mean: str, ddof: int,
) -> Metrics:  # fmt: skip
  """All metrics from cell moments (scatter projected on `geo.basis`).

  count, sqdev (sum |h - cell mean|^2), dist (sum |h - centre|), mismatch:
  (J,); mean: J x D; scatter: G x P x P, sum over group g of z z^T with
  z = basis (h - cell mean), pooled over the group's cells.
  """
  acc = mean.dtype
  k, nj = w.shape[0], count.shape[0]
  g = nj // k
  n_kg = count.reshape(k, g).astype(acc)
  n_g, n_c, n = n_kg.sum(0), n_kg.sum(1), n_kg.sum()
  present = n_kg > 0
  mean_kg = mean.reshape(k, g, -1)
  m = geo.centres - geo.mu_g
  gram_b = jnp.matmul(m, m.T, precision=_HI)
  sel = slice(nj, nj + k)  # basis rows that are the rows of M

  # Cell offsets from their class centre, for the parallel-axis theorem:
  # sum_{cell} (h - a)(h - a)^T = S_cell + n e e^T, e = cell mean - a.
  e = jnp.where(present[..., None], mean_kg - geo.centres[:, None], 0)
  e2 = jnp.sum(e * e, -1)
  ce = jnp.einsum("pd,kgd->gkp", geo.basis, e, precision=_HI)
  shifted = scatter + jnp.einsum("kg,gkp,gkq->gpq", n_kg, ce, ce, precision=_HI)
  x_g = shifted[:, sel, sel] / n_g[:, None, None]
  x_all = shifted.sum(0)[sel, sel] / n

  # Group a alone: M^a rows m_ca - mu_G^a = T^a basis, T^a = I_a - 1 alpha^T.
  alpha = jnp.full((k, g), 1.0 / k, acc) if global_mean == "unweighted" else n_kg / n_g
  own_m = mean_kg - jnp.einsum("kg,kgd->gd", alpha, mean_kg, precision=_HI)[None]
  own_gram = jnp.einsum("kgd,lgd->gkl", own_m, own_m, precision=_HI)
  cols = jnp.arange(k)[:, None] * g + jnp.arange(g)[None]  # k x g cell index
  pick = jax.nn.one_hot(cols.T, nj + k, dtype=acc)  # g x k x P
  t = pick - jnp.einsum("kg,gkp->gp", alpha, pick)[:, None]
  x_own = jnp.einsum("gkp,gpq,glq->gkl", t, scatter, t, precision=_HI) / n_g[:, None, None]

  # One batched eigh for the overall, per-group and own NC1 (compiles faster).
  nc1s = jax.vmap(_nc1)(
      jnp.concatenate([x_all[None], x_g, x_own]),
      jnp.concatenate([gram_b[None], jnp.broadcast_to(gram_b, (g, k, k)), own_gram]),
  )
  nc1, nc1_g, nc1_own = nc1s[0], nc1s[1 : 1 + g], nc1s[1 + g :]
  nc1_own = jnp.where(jnp.all(present, 0), nc1_own, jnp.nan)

  within = jnp.sum(sqdev.reshape(k, g) + n_kg * e2, 1)  # per class, around centres
  tr_b = jnp.trace(gram_b) / k
  var = within / n_c
  iu = np.triu_indices(k, 1)
  diff = geo.centres[:, None] - geo.centres[None]
  sep = jnp.sum(diff * diff, -1)[iu]
  cdnv = jnp.mean((var[:, None] + var[None])[iu] / (2 * jnp.where(sep > 0, sep, jnp.nan)))
  valid_centres = jnp.all(jnp.isfinite(geo.centres))

  nc2 = jax.vmap(functools.partial(_nc2, ddof=ddof))(jnp.stack([w, m]))
  wm = jnp.matmul(w, m.T, precision=_HI)
  out = {
      "nc1": nc1,
      "nc1_trace": jnp.sum(within) / n / jnp.where(tr_b > 0, tr_b, jnp.nan),
      "nc1_cdnv": cdnv,
      "nc1_dist": jnp.sum(dist) / n,
      **{f"nc2_{k_}_w": v[0] for k_, v in nc2.items()},
      **{f"nc2_{k_}_m": v[1] for k_, v in nc2.items()},
      "nc3": jnp.sum((w / jnp.linalg.norm(w) - m / jnp.linalg.norm(m)) ** 2),
      "nc3_wh": _etf_error(wm),
      "nc4": jnp.where(valid_centres, jnp.sum(mismatch) / n, jnp.nan),
  }
  dist_g = dist.reshape(k, g).sum(0) / n_g
  for a in range(g):
    out[f"nc1/g{a}"] = nc1_g[a]
    out[f"nc1_dist/g{a}"] = dist_g[a]
    out[f"nc1_own/g{a}"] = nc1_own[a]
  return {key: v.astype(acc) for key, v in out.items()}


# ----------------------------------------------------------------------------
# In-memory kernel.


def _kernel(feats, labels, groups, w, b, centers, *, k, g, global_mean, ddof, chunk):
  acc = _acc_dtype()
  feats = jnp.asarray(feats)
  if not jnp.issubdtype(feats.dtype, jnp.floating):
    feats = feats.astype(acc)
  nj = k * g
  w, b = jnp.asarray(w, acc), jnp.asarray(b, acc)
  cells = _cells(labels, groups, k, g)
  shift = _shift(feats, cells, nj, chunk)
  count, mean, nonfinite = _cell_means(feats, cells, shift, nj, chunk)
  centres = None if centers is None else jnp.asarray(centers, acc) - shift.astype(acc)
  geo = _geometry(count, mean, centres, k, g, global_mean)
  proj = jnp.concatenate([geo.basis, w]).astype(feats.dtype)

  def body(_, h, c):
    x = _centred(h, c, shift, mean, nj)
    z = jnp.matmul(x, proj.T, precision=_HI)
    return (), (z.astype(acc), jnp.sum(x * x, 1).astype(acc))

  _, (z, rr) = _scan_rows(body, (), (feats, cells), chunk)
  p = nj + k
  zc, zw = z[:, :p], z[:, p:]
  ok = cells < nj
  okf = ok.astype(acc)
  c = jnp.minimum(cells, nj - 1)
  y, grp = c // g, c % g

  # |h - a_k|^2 = |r|^2 + 2 r.(m_j - a_k) + |m_j - a_k|^2, r = h - m_j; the
  # basis rows m_j - mu_G and a_k - mu_G give r.(m_j - a_k) as a difference.
  off = mean[:, None] - geo.centres[None]  # J x K x D
  off2 = jnp.sum(off * off, -1)
  r_off = jnp.take_along_axis(zc, c[:, None], 1) - zc[:, nj:]
  d2 = jnp.maximum(rr[:, None] + 2 * r_off + off2[c], 0)
  own = jnp.sqrt(jnp.take_along_axis(d2, y[:, None], 1)[:, 0])
  logits = zw + jnp.matmul(mean, w.T, precision=_HI)[c] + (w @ shift.astype(acc) + b)
  mism = (jnp.argmax(logits, 1) != jnp.argmin(d2, 1)).astype(acc)

  oh_g = jax.nn.one_hot(grp, g, dtype=acc) * okf[:, None]
  scatter = jnp.einsum("ng,np,nq->gpq", oh_g, zc, zc, precision=_HI)
  # Centre the projections exactly on their cell means (removes what rounding
  # the means to the feature dtype left over).
  zbar = jax.ops.segment_sum(zc * okf[:, None], c, nj) / jnp.maximum(count, 1)[:, None]
  zz = count.astype(acc)[:, None, None] * zbar[:, :, None] * zbar[:, None, :]
  scatter = scatter - zz.reshape(k, g, p, p).sum(0)
  seg = lambda v: jax.ops.segment_sum(v * okf, c, nj)  # noqa: E731
  out = _metrics(
      count, mean, seg(rr), scatter, seg(own), seg(mism), geo, w,
      global_mean=global_mean, ddof=ddof,
  )  # fmt: skip
  return out, nonfinite


def make_metrics_fn(
    num_classes: int,
    num_groups: int = 1,
    global_mean: str = "unweighted",
    ddof: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Callable[..., Metrics]:
  """A pure, jittable, vmappable `fn(feats, labels, groups, w, b, centers=None)`.

  Returns every key of `metric_names(range(num_groups))` as a scalar array.
  `groups` may be None (one group). Rows with a label outside
  [0, num_classes) or a group outside [0, num_groups) are padding. Arithmetic
  runs in the feature dtype for products over D (HIGHEST precision) and in
  float64 for sums and algebra if x64 is enabled, else float32. Non-finite
  features give NaN metrics. Vmap over members: `jax.vmap(fn, (0, None, None,
  0, 0))`.
  """
  _check_options(num_classes, num_groups, global_mean, ddof, chunk_size)
  kernel = functools.partial(
      _kernel, k=num_classes, g=num_groups, global_mean=global_mean, ddof=ddof,
      chunk=chunk_size,
  )  # fmt: skip

  def fn(feats, labels, groups, w, b, centers=None) -> Metrics:
    return kernel(feats, labels, groups, w, b, centers)[0]

  return fn


@functools.lru_cache(maxsize=64)
def _jitted_kernel(k, g, global_mean, ddof, chunk):
  return jax.jit(functools.partial(
      _kernel, k=k, g=g, global_mean=global_mean, ddof=ddof, chunk=chunk,
  ))  # fmt: skip


# ----------------------------------------------------------------------------
# Streaming: per-batch statistics merged with Chan et al.'s parallel update.


class CellStats(NamedTuple):
  """Sufficient statistics of K x G cells (J = K*G, cell j = class * G + group).

  Means are relative to `shift` (a reference point that keeps float32 sums
  precise); `scatter[a]` is the within-cell scatter sum (h - m_j)(h - m_j)^T
  pooled over the cells of group a (all NC1 variants need only these).
  """

  shift: Array  # D
  count: Array  # J, int32
  mean: Array  # J x D, 0 where count is 0
  sqdev: Array  # J, sum |h - m_j|^2
  scatter: Array  # G x D x D


class DistanceStats(NamedTuple):
  """Second-pass sums per cell: |h - mu_y| (nc1_dist) and NC4 mismatches."""

  dist: Array  # J
  mismatch: Array  # J


def cell_stats(
    feats, labels, groups, num_classes: int, num_groups: int = 1, *,
    shift=None, chunk_size: int = DEFAULT_CHUNK,
) -> CellStats:  # fmt: skip
  """Cell statistics of one batch (jittable; padding rows as in make_metrics_fn).

  Pass the `shift` of earlier statistics so that merging them needs no
  re-basing of the means.
  """
  acc = _acc_dtype()
  feats = jnp.asarray(feats)
  nj = num_classes * num_groups
  cells = _cells(labels, groups, num_classes, num_groups)
  if shift is None:
    shift = _shift(feats, cells, nj, chunk_size)
  shift = jnp.asarray(shift).astype(feats.dtype)
  count, mean, _ = _cell_means(feats, cells, shift, nj, chunk_size)
  d = feats.shape[1]

  def body(carry, h, c):
    s, sq = carry
    x = _centred(h, c, shift, mean, nj)
    grp = jax.nn.one_hot(jnp.minimum(c, nj - 1) % num_groups, num_groups, dtype=h.dtype)
    xg = (grp[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)
    s = s + jnp.matmul(xg.T, x, precision=_HI).astype(acc).reshape(num_groups, d, d)
    sq = sq + jax.ops.segment_sum(jnp.sum(x * x, 1).astype(acc), c, nj + 1)[:nj]
    return (s, sq), ()

  init = (jnp.zeros((num_groups, d, d), acc), jnp.zeros(nj, acc))
  (scatter, sqdev), _ = _scan_rows(body, init, (feats, cells), chunk_size)
  return CellStats(shift.astype(acc), count, mean, sqdev, scatter)


def merge(a, b):
  """Merges two CellStats (Chan et al. 1982) or two DistanceStats (sums)."""
  if isinstance(a, DistanceStats):
    return DistanceStats(a.dist + b.dist, a.mismatch + b.mismatch)
  g = a.scatter.shape[0]
  k = a.count.shape[0] // g
  mean_b = jnp.where((b.count > 0)[:, None], b.mean + (b.shift - a.shift), 0)
  na, nb = a.count.astype(a.mean.dtype), b.count.astype(a.mean.dtype)
  n = na + nb
  safe = jnp.maximum(n, 1)
  delta = jnp.where(((a.count > 0) & (b.count > 0))[:, None], mean_b - a.mean, 0)
  mean = jnp.where((a.count > 0)[:, None], a.mean, mean_b) + delta * (nb / safe)[:, None]
  weight = na * nb / safe
  dk = delta.reshape(k, g, -1)
  extra = jnp.einsum("kg,kgd,kge->gde", weight.reshape(k, g), dk, dk, precision=_HI)
  return CellStats(
      a.shift, a.count + b.count, mean,
      a.sqdev + b.sqdev + weight * jnp.sum(delta * delta, 1),
      a.scatter + b.scatter + extra,
  )  # fmt: skip


def _stats_centres(stats: CellStats, centers, k: int, global_mean: str) -> _Geometry:
  g = stats.scatter.shape[0]
  centres = None if centers is None else jnp.asarray(centers, stats.mean.dtype) - stats.shift
  return _geometry(stats.count, stats.mean, centres, k, g, global_mean)


def distance_stats(
    feats, labels, groups, stats: CellStats, w, b, centers=None, *,
    global_mean: str = "unweighted",
) -> DistanceStats:  # fmt: skip
  """Second pass over one batch: distances to the final centres, NC4 mismatches."""
  acc = stats.mean.dtype
  w, b = jnp.asarray(w, acc), jnp.asarray(b, acc)
  k = w.shape[0]
  nj = stats.count.shape[0]
  geo = _stats_centres(stats, centers, k, global_mean)
  cells = _cells(labels, groups, k, nj // k)
  ok = cells < nj
  x = jnp.where(ok[:, None], jnp.asarray(feats).astype(acc) - stats.shift, 0)
  d2 = jnp.sum((x[:, None] - geo.centres[None]) ** 2, -1)  # N x K
  y = jnp.minimum(cells, nj - 1) // (nj // k)
  own = jnp.sqrt(jnp.take_along_axis(d2, y[:, None], 1)[:, 0])
  logits = jnp.matmul(x, w.T, precision=_HI) + (w @ stats.shift + b)
  mism = (jnp.argmax(logits, 1) != jnp.argmin(d2, 1)).astype(acc)
  seg = lambda v: jax.ops.segment_sum(jnp.where(ok, v, 0), cells, nj + 1)[:nj]  # noqa: E731
  return DistanceStats(seg(own), seg(mism))


def metrics_from_stats(
    stats: CellStats, w, *, distances: DistanceStats | None = None,
    centers=None, global_mean: str = "unweighted", ddof: int = 0,
) -> Metrics:  # fmt: skip
  """All metrics from merged statistics (jittable; keys as make_metrics_fn).

  Without `distances` (the second pass), nc1_dist, nc1_dist/g* and nc4 are
  NaN. The bias enters only through `distance_stats` (NC4).
  """
  acc = stats.mean.dtype
  w = jnp.asarray(w, acc)
  geo = _stats_centres(stats, centers, w.shape[0], global_mean)
  scatter = jnp.einsum("pd,gde,qe->gpq", geo.basis, stats.scatter, geo.basis, precision=_HI)
  nan = jnp.full(stats.count.shape, jnp.nan, acc)
  dist = distances.dist if distances is not None else nan
  mismatch = distances.mismatch if distances is not None else nan
  return _metrics(
      stats.count, stats.mean, stats.sqdev, scatter, dist, mismatch, geo, w,
      global_mean=global_mean, ddof=ddof,
  )  # fmt: skip


# ----------------------------------------------------------------------------
# Noisy samples (the paper's Fig. 1 mechanism).


def flipped_near_true_kernel(
    feats, labels, flipped, *, true_class: int = 1, flipped_class: int = 0
) -> Array:
  """Jittable `flipped_near_true`; NaN without flipped samples or a class."""
  acc = _acc_dtype()
  feats = jnp.asarray(feats)
  labels = jnp.asarray(labels)
  x = (feats - jnp.mean(feats[:DEFAULT_CHUNK], 0)).astype(acc)

  def mean_of(c):
    m = (labels == c)[:, None]
    n = jnp.sum(m)
    return jnp.sum(jnp.where(m, x, 0), 0) / jnp.maximum(n, 1), n

  mu_t, n_t = mean_of(true_class)
  mu_f, n_f = mean_of(flipped_class)
  # |x - mu_t|^2 < |x - mu_f|^2  <=>  (2x - mu_t - mu_f) . (mu_f - mu_t) < 0;
  # the midpoint form has no cancellation between large squared norms.
  closer = jnp.matmul(2 * x - mu_t - mu_f, mu_f - mu_t, precision=_HI) < 0
  flipped = jnp.asarray(flipped).astype(bool)
  n_fl = jnp.sum(flipped)
  frac = jnp.sum(closer & flipped) / jnp.maximum(n_fl, 1).astype(acc)
  return jnp.where((n_t > 0) & (n_f > 0) & (n_fl > 0), frac, jnp.nan)


def flipped_near_true(
    feats, trained_labels, flipped_mask, *, true_class: int = 1, flipped_class: int = 0
) -> float:
  """Fraction of flipped samples closer to their true-class mean (SPEC 5).

  Among the samples with `flipped_mask` (positives relabelled negative), the
  fraction whose feature is nearer the mean of class `true_class` than the
  mean of class `flipped_class`; class means are taken over all samples with
  the trained labels. NaN when there are no flipped samples or a class is
  empty.
  """
  feats = _features(feats)
  n = feats.shape[0]
  labels = _int_vector(trained_labels, n, "trained_labels")
  mask = np.asarray(flipped_mask)
  if mask.shape != (n,) or not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
    raise DataError(f"flipped_mask must be {n} booleans, got {mask.dtype} {mask.shape}")
  with _enable_x64():
    fn = _jit_flipped(true_class, flipped_class)
    out, finite = jax.device_get(fn(feats, labels, mask.astype(bool)))
  if not finite:
    raise DataError("features contain NaN or inf")
  return float(out)


@functools.lru_cache(maxsize=8)
def _jit_flipped(true_class, flipped_class):
  def fn(feats, labels, mask):
    frac = flipped_near_true_kernel(
        feats, labels, mask, true_class=true_class, flipped_class=flipped_class
    )
    return frac, jnp.all(jnp.isfinite(feats))

  return jax.jit(fn)


# ----------------------------------------------------------------------------
# Host side: checked input, float64, plain floats.


def _check_options(k, g, global_mean, ddof, chunk) -> None:
  if not isinstance(k, (int, np.integer)) or k < 2:
    raise ConfigError(f"need at least 2 classes, got {k!r}")
  if not isinstance(g, (int, np.integer)) or g < 1:
    raise ConfigError(f"need at least 1 group, got {g!r}")
  if global_mean not in GLOBAL_MEANS:
    raise ConfigError(f"global_mean must be one of {GLOBAL_MEANS}, got {global_mean!r}")
  if not isinstance(ddof, (int, np.integer)) or ddof < 0:
    raise ConfigError(f"ddof must be an int >= 0, got {ddof!r}")
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ConfigError(f"chunk_size must be an int >= 1, got {chunk!r}")


def _features(feats):
  """float64 stays float64 (exact path); other floats run as float32."""
  if not isinstance(feats, jax.Array):
    feats = np.asarray(feats)
  if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
    raise DataError(f"features must be N x D with N, D >= 1, got shape {feats.shape}")
  if feats.dtype == np.float64 or feats.dtype == np.float32:
    return feats
  if not np.issubdtype(feats.dtype, np.number) or np.issubdtype(feats.dtype, np.complexfloating):
    raise DataError(f"features must be real numbers, got dtype {feats.dtype}")
  return feats.astype(np.float32 if np.issubdtype(feats.dtype, np.floating) else np.float64)


def _int_vector(v, n: int, name: str, low: int | None = None, high: int | None = None):
  v = np.asarray(v)
  if v.shape != (n,):
    raise DataError(f"{name} must have shape ({n},) to match the features, got {v.shape}")
  if not (np.issubdtype(v.dtype, np.integer) or v.dtype == bool):
    raise DataError(f"{name} must be integers, got dtype {v.dtype}")
  v = v.astype(np.int64)
  if low is not None and (v.min() < low or v.max() >= high):
    bad = v[(v < low) | (v >= high)]
    raise DataError(f"{name} must lie in [{low}, {high}); found {sorted(set(bad.tolist()))[:5]}")
  return v.astype(np.int32)


def _matrix(v, shape: tuple[int, ...], name: str) -> np.ndarray:
  v = np.asarray(v, dtype=np.float64)
  if v.shape != shape:
    raise DataError(f"{name} must have shape {shape}, got {v.shape}")
  if not np.isfinite(v).all():
    raise DataError(f"{name} contains NaN or inf")
  return v


def _check_classifier(w, b, d: int | None):
  w = np.asarray(w, dtype=np.float64)
  if w.ndim != 2 or w.shape[0] < 2:
    raise DataError(f"w must be K x D with K >= 2, got shape {w.shape}")
  if d is not None and w.shape[1] != d:
    raise DataError(f"w has {w.shape[1]} columns but the features have D = {d}")
  k = w.shape[0]
  return _matrix(w, w.shape, "w"), _matrix(b, (k,), "b")


def _floats(out: dict[str, Any], group_ids: Sequence[Any]) -> dict[str, float]:
  """Plain floats, per-group keys renamed from indices to the group values."""
  res = {key: float(out[key]) for key in OVERALL_KEYS}
  for i, a in enumerate(group_ids):
    for key in GROUP_KEYS:
      res[f"{key}/g{a}"] = float(out[f"{key}/g{i}"])
  return res


def compute(
    feats, labels, w, b, groups=None, *, centers=None,
    global_mean: str = "unweighted", ddof: int = 0,
) -> dict[str, float]:  # fmt: skip
  """All NC metrics of one feature set (SPEC section 5), as floats.

  Args:
    feats: N x D features (numpy or jax). float64 input is computed exactly
      in float64; float32 input runs its products over D in float32 (HIGHEST
      precision) on centred chunks and everything else in float64.
    labels: N ints in [0, K), the labels the model was trained on.
    w, b: the classifier, K x D and K; K is the number of classes.
    groups: N ints (any values) or None; adds `nc1/g{a}`, `nc1_dist/g{a}`,
      `nc1_own/g{a}` for each distinct value a.
    centers: K x D class means to measure around (e.g. the train means for
      test features); default the class means of `feats`.
    global_mean: "unweighted" (mean of class means, Papyan) or "sample"
      (class means weighted by the class counts of `labels`, also when
      `centers` are given). Log which one was used.
    ddof: delta degrees of freedom of the NC2 standard deviations.

  Returns:
    `metric_names(sorted group values)` -> float; NaN where undefined (see the
    module docstring).

  Raises:
    DataError: mismatched shapes, labels outside [0, K), non-integer labels or
      groups, non-finite features, classifier or centres.
    ConfigError: an unknown `global_mean` or a negative `ddof`.
  """
  feats = _features(feats)
  n, d = feats.shape
  w, b = _check_classifier(w, b, d)
  k = w.shape[0]
  _check_options(k, 1, global_mean, ddof, DEFAULT_CHUNK)
  labels = _int_vector(labels, n, "labels", 0, k)
  if groups is None:
    group_ids, gidx = [], np.zeros(n, np.int32)
  else:
    group_ids, gidx = np.unique(_int_vector(groups, n, "groups"), return_inverse=True)
    group_ids = group_ids.tolist()
  if centers is not None:
    centers = _matrix(centers, (k, d), "centers")
  feats, labels, gidx, w, centers = _pad_small(feats, labels, gidx.astype(np.int32), w, centers)
  with _enable_x64():
    fn = _jitted_kernel(k, max(len(group_ids), 1), global_mean, int(ddof), DEFAULT_CHUNK)
    out, nonfinite = jax.device_get(fn(_zero_copy(feats), labels, gidx, w, b, centers))
  if nonfinite:
    raise DataError("features contain NaN or inf")
  return _floats(out, group_ids)


def _pad_small(feats, labels, groups, w, centers):
  """Pads small inputs to power-of-two N and D, so calls on differently sized
  subsets share one compiled kernel. Padding rows carry label -1; zero
  columns change no distance, norm or product."""
  n, d = feats.shape
  if n * d > 1 << 16:
    return feats, labels, groups, w, centers
  n2, d2 = max(16, 1 << (n - 1).bit_length()), max(4, 1 << (d - 1).bit_length())
  pad = jnp.pad if isinstance(feats, jax.Array) else np.pad
  feats = pad(feats, ((0, n2 - n), (0, d2 - d)))
  labels = np.pad(labels, (0, n2 - n), constant_values=-1)
  groups = np.pad(groups, (0, n2 - n))
  w = np.pad(w, ((0, 0), (0, d2 - d)))
  centers = None if centers is None else np.pad(centers, ((0, 0), (0, d2 - d)))
  return feats, labels, groups, w, centers


def _zero_copy(feats):
  """On CPU, JAX aliases a numpy array only if it is 64-byte aligned; numpy's
  large allocations are not, and JAX's own copy is ~2x slower than numpy's."""
  if (
      isinstance(feats, np.ndarray)
      and feats.ctypes.data % 64
      and feats.nbytes > 1 << 20
      and jax.default_backend() == "cpu"
  ):
    buf = np.empty(feats.nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start : start + feats.nbytes].view(feats.dtype).reshape(feats.shape)
    np.copyto(out, feats)
    return out
  return feats


def compute_streaming(
    batches: Callable[[], Iterable[tuple]], w, b, *, num_groups: int = 1,
    centers=None, global_mean: str = "unweighted", ddof: int = 0,
    second_pass: bool = True, chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:  # fmt: skip
  """`compute` over batches that need not fit in memory together.

  `batches()` returns a fresh iterator of (feats, labels) or (feats, labels,
  groups) tuples, groups in [0, num_groups). The first pass merges cell
  statistics; the second (skipped with `second_pass=False`, then nc1_dist*
  and nc4 are NaN) measures distances to the final means. Keys as `compute`,
  per-group keys for the groups that have samples.
  """
  w, b = _check_classifier(w, b, None)
  k, d = w.shape
  _check_options(k, num_groups, global_mean, ddof, chunk_size)
  if centers is not None:
    centers = _matrix(centers, (k, d), "centers")
  statics = dict(num_classes=k, num_groups=num_groups, chunk_size=chunk_size)
  with _enable_x64():
    stats = None
    for feats, labels, groups in _checked_batches(batches(), k, d, num_groups):
      shift = None if stats is None else stats.shift
      s = _jit_cell_stats(feats, labels, groups, shift=shift, **statics)
      stats = s if stats is None else _jit_merge(stats, s)
    if stats is None:
      raise DataError("batches() yielded no batch")
    dist = None
    if second_pass:
      for feats, labels, groups in _checked_batches(batches(), k, d, num_groups):
        s = _jit_distance_stats(
            feats, labels, groups, stats, w, b, centers, global_mean=global_mean
        )
        dist = s if dist is None else _jit_merge(dist, s)
    out = _jit_metrics_from_stats(
        stats, w, distances=dist, centers=centers, global_mean=global_mean, ddof=int(ddof)
    )
    out, count = jax.device_get((out, stats.count))
  present = count.reshape(k, num_groups).sum(0) > 0
  return _floats(out, [a for a in range(num_groups) if present[a]])


def _checked_batches(it: Iterable[tuple], k: int, d: int, g: int):
  for i, batch in enumerate(it):
    if len(batch) not in (2, 3):
      raise DataError(f"batch {i}: expected (feats, labels[, groups]), got {len(batch)} items")
    feats = _features(batch[0])
    n = feats.shape[0]
    if feats.shape[1] != d:
      raise DataError(f"batch {i}: features have D = {feats.shape[1]}, w has {d} columns")
    if not np.isfinite(np.asarray(feats)).all():
      raise DataError(f"batch {i}: features contain NaN or inf")
    labels = _int_vector(batch[1], n, f"batch {i} labels", 0, k)
    groups = None if len(batch) == 2 or batch[2] is None else batch[2]
    if groups is None:
      groups = np.zeros(n, np.int32)
    else:
      groups = _int_vector(groups, n, f"batch {i} groups", 0, g)
    yield feats, labels, groups


_jit_cell_stats = jax.jit(cell_stats, static_argnames=("num_classes", "num_groups", "chunk_size"))
_jit_merge = jax.jit(merge)
_jit_distance_stats = jax.jit(distance_stats, static_argnames=("global_mean",))
_jit_metrics_from_stats = jax.jit(metrics_from_stats, static_argnames=("global_mean", "ddof"))
