"""Tests of ncjax.neural_collapse against SPEC section 5 and a numpy reference.

Shapes are chosen so that tests share compiled kernels (`compute` pads small
inputs to power-of-two shapes): compiling, not computing, is the cost here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ncjax import neural_collapse as nc
from ncjax.errors import ConfigError, DataError

ATOL = 1e-6  # SPEC section 5: closed forms hold to 1e-6 in float64


# ----------------------------------------------------------------------------
# Independent reference: per-class loops, explicit D x D covariances, the
# rank-(K-1) inverse of Sigma_B from scipy's eigh of the D x D matrix.


def _ref_nc1(sw, mu, mu_g):
  k = mu.shape[0]
  m = mu - mu_g
  vals, vecs = scipy.linalg.eigh(m.T @ m / k)
  v, lam = vecs[:, -(k - 1) :], vals[-(k - 1) :]
  return np.trace(sw @ (v / lam) @ v.T) / k


def reference(feats, labels, w, b, groups=None, centers=None, global_mean="unweighted", ddof=0):
  h = np.asarray(feats, np.float64)
  y = np.asarray(labels)
  w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
  n, d = h.shape
  k = w.shape[0]

  def class_means(hh, yy):
    nan = np.full(d, np.nan)
    return np.stack([hh[yy == c].mean(0) if np.any(yy == c) else nan for c in range(k)])

  def global_of(mu, yy):
    if global_mean == "unweighted":
      return mu.mean(0)
    return np.array([np.mean(yy == c) for c in range(k)]) @ mu

  def within(hh, yy, mu):
    s = np.zeros((d, d))
    for c in range(k):
      r = hh[yy == c] - mu[c]
      s += r.T @ r
    return s / len(hh)

  def nc2(v):
    norms = np.linalg.norm(v, axis=1)
    cos = np.array([v[i] @ v[j] / (norms[i] * norms[j]) for i in range(k) for j in range(i + 1, k)])
    g = v @ v.T
    etf = (np.eye(k) - 1 / k) / np.sqrt(k - 1)
    return {
        "equinorm": np.std(norms, ddof=ddof) / np.mean(norms),
        "equiangular": np.std(cos, ddof=ddof) if len(cos) > ddof else np.nan,
        "maxangle": np.mean(np.abs(cos + 1 / (k - 1))),
        "etf": np.linalg.norm(g / np.linalg.norm(g) - etf),
    }

  mu = class_means(h, y) if centers is None else np.asarray(centers, np.float64)
  mu_g = global_of(mu, y)
  m = mu - mu_g
  sw = within(h, y, mu)
  out = {"nc1": _ref_nc1(sw, mu, mu_g), "nc1_trace": np.trace(sw) / np.trace(m.T @ m / k)}
  var = [np.mean(np.sum((h[y == c] - mu[c]) ** 2, 1)) for c in range(k)]
  pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
  out["nc1_cdnv"] = np.mean(
      [(var[i] + var[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2)) for i, j in pairs]
  )
  dist = np.array([np.linalg.norm(h[i] - mu[y[i]]) for i in range(n)])
  out["nc1_dist"] = dist.mean()
  for name, mat in (("w", w), ("m", m)):
    for key, val in nc2(mat).items():
      out[f"nc2_{key}_{name}"] = val
  out["nc3"] = np.sum((w / np.linalg.norm(w) - m / np.linalg.norm(m)) ** 2)
  wm = w @ m.T
  out["nc3_wh"] = np.linalg.norm(wm / np.linalg.norm(wm) - (np.eye(k) - 1 / k) / np.sqrt(k - 1))
  mismatches = 0
  for i in range(n):
    ncc = np.argmin([np.linalg.norm(h[i] - mu[c]) for c in range(k)])
    mismatches += np.argmax(w @ h[i] + b) != ncc
  out["nc4"] = mismatches / n
  if groups is not None:
    groups = np.asarray(groups)
    for a in np.unique(groups):
      sel = groups == a
      out[f"nc1/g{a}"] = _ref_nc1(within(h[sel], y[sel], mu), mu, mu_g)
      out[f"nc1_dist/g{a}"] = dist[sel].mean()
      own = class_means(h[sel], y[sel])
      own_nc1 = np.nan
      if not np.isnan(own).any():
        own_nc1 = _ref_nc1(within(h[sel], y[sel], own), own, global_of(own, y[sel]))
      out[f"nc1_own/g{a}"] = own_nc1
  return out


def assert_metrics_close(got, want, rtol=1e-9, atol=1e-12):
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


def random_problem(seed, n=300, d=7, k=2, g=2, dtype=np.float64):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  groups = rng.integers(0, g, n)
  mu = 2 * rng.standard_normal((k, d))
  shift = 0.5 * rng.standard_normal((g, d))
  feats = mu[labels] + shift[groups] + rng.standard_normal((n, d)) * (1 + labels[:, None])
  return feats.astype(dtype), labels, groups, rng.standard_normal((k, d)), rng.standard_normal(k)


# ----------------------------------------------------------------------------
# Closed forms (SPEC section 5, checks A-I).


def _two_class(points, labels, w=((-1.0, 0.0), (1.0, 0.0)), b=(0.0, 0.0), **kwargs):
  return nc.compute(np.array(points, float), np.array(labels), np.array(w), np.array(b), **kwargs)


def test_a_perfect_collapse_on_rotated_simplex():
  k, d = 4, 6
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  etf = np.sqrt(k / (k - 1)) * (np.eye(k) - 1 / k)  # columns: a simplex ETF
  means = 3 * (q[:, :k] @ etf).T + rng.standard_normal(d)
  labels = np.repeat(np.arange(k), 5)
  m = means - means.mean(0)
  w = 0.7 * m
  out = nc.compute(means[labels], labels, w, -w @ means.mean(0))
  for key in ("nc1", "nc1_trace", "nc1_dist", "nc3", "nc3_wh", "nc4") + tuple(
      f"nc2_{a}_{b}" for a in ("equinorm", "equiangular", "maxangle", "etf") for b in "wm"
  ):
    assert abs(out[key]) < ATOL, (key, out[key])


def test_b_noise_along_d():
  e = 0.1
  out = _two_class([(-1 - e, 0), (-1 + e, 0), (1 - e, 0), (1 + e, 0)], [0, 0, 1, 1])
  np.testing.assert_allclose(out["nc1"], e**2 / 2, atol=ATOL)
  np.testing.assert_allclose(out["nc1_trace"], e**2, atol=ATOL)
  np.testing.assert_allclose(out["nc1_dist"], e, atol=ATOL)
  for key in ("nc2_equinorm_m", "nc2_equiangular_m", "nc2_maxangle_m", "nc2_etf_m"):
    assert abs(out[key]) < ATOL, key


def test_compute_uses_float64_without_enabling_x64_globally():
  x = np.array([[0.0], [1e-9], [1.0], [1.0 + 3e-9]])
  out = _two_class(x, [0, 0, 1, 1], w=[(-1.0,), (1.0,)])
  tr_w = 2 * (0.5e-9**2 + 1.5e-9**2) / 4  # float32 would give 0 or noise
  np.testing.assert_allclose(out["nc1_trace"], tr_w / 0.25, rtol=1e-6)
  assert jnp.ones(1).dtype == jnp.float32 and not jax.config.jax_enable_x64


def test_c_noise_orthogonal_to_d_is_invisible_to_nc1():
  out = _two_class([(-1, 0.1), (-1, -0.1), (1, 0.1), (1, -0.1)], [0, 0, 1, 1])
  assert abs(out["nc1"]) < ATOL
  np.testing.assert_allclose(out["nc1_trace"], 0.01, atol=ATOL)
  np.testing.assert_allclose(out["nc1_cdnv"], 0.0025, atol=ATOL)


def test_d_imbalance_global_mean_conventions():
  points, labels = [(-1, 0)] * 8 + [(1, 0)] * 2, [0] * 8 + [1] * 2
  unweighted = _two_class(points, labels)
  for key in ("nc2_equinorm_m", "nc2_equiangular_m", "nc2_maxangle_m", "nc2_etf_m"):
    assert abs(unweighted[key]) < ATOL, key
  sample = _two_class(points, labels, global_mean="sample")
  np.testing.assert_allclose(sample["nc2_equinorm_m"], 0.6, atol=ATOL)
  np.testing.assert_allclose(sample["nc2_etf_m"], 0.727607, atol=ATOL)
  assert abs(sample["nc2_equiangular_m"]) < ATOL and abs(sample["nc2_maxangle_m"]) < ATOL


@pytest.mark.parametrize("c, papyan", [(0.0, 0.0), (0.5, 0.211146), (2.0, 1.105573)])
def test_e_nc3_forms(c, papyan):
  out = _two_class([(-1, 0, 0), (1, 0, 0)], [0, 1], w=[(-1, 0, c), (1, 0, c)], b=(0, 0))
  np.testing.assert_allclose(out["nc3"], papyan, atol=ATOL)
  assert abs(out["nc3_wh"]) < ATOL  # the WH form is blind for K = 2


def test_h_non_etf_three_classes():
  m = np.array([(1.0, 0.0), (0.0, 1.0), (-1.0, -1.0)])
  out = nc.compute(m, np.arange(3), m, np.zeros(3))
  want = {"equinorm": 0.171573, "equiangular": 0.333333, "maxangle": 0.304738, "etf": 0.459506}
  for key, value in want.items():
    np.testing.assert_allclose(out[f"nc2_{key}_m"], value, atol=ATOL)
    np.testing.assert_allclose(out[f"nc2_{key}_w"], value, atol=ATOL)
  assert abs(out["nc3"]) < ATOL
  np.testing.assert_allclose(out["nc3_wh"], 0.459506, atol=ATOL)


def test_i_nc4_includes_the_bias():
  points, labels = [(-0.5,), (0.5,), (1.5,), (2.5,)], [0, 0, 1, 1]
  w = [(-1.0,), (1.0,)]
  assert _two_class(points, labels, w=w, b=(1.0, -1.0))["nc4"] == 0.0
  assert _two_class(points, labels, w=w, b=(0.0, 0.0))["nc4"] == 0.25


def test_gaussian_classes_nc1_tends_to_sigma2_over_2delta2():
  rng = np.random.default_rng(1)
  n, d = 1 << 15, 4  # float32, shape of float32_problem: one compiled kernel
  labels = np.arange(n) % 2
  for delta, sigma in ((1.0, 0.5), (2.0, 0.1)):
    mu = np.zeros((2, d))
    mu[:, 0] = (delta, -delta)
    feats = (mu[labels] + sigma * rng.standard_normal((n, d))).astype(np.float32)
    out = nc.compute(feats, labels, np.eye(2, d), np.zeros(2))
    np.testing.assert_allclose(out["nc1"], sigma**2 / (2 * delta**2), rtol=0.03)


# ----------------------------------------------------------------------------
# Against the reference on random data.


@pytest.mark.parametrize(
    "k, g, global_mean, ddof, with_centers",
    [(2, 2, "unweighted", 0, False), (3, 3, "sample", 1, True), (4, 1, "unweighted", 0, False)],
)
def test_matches_reference(k, g, global_mean, ddof, with_centers):
  n = 32 if k == 4 else 300  # K = 4 shares its compiled kernel with check A
  feats, labels, groups, w, b = random_problem(k + g, n=n, k=k, g=g)
  centers = feats[:k] + 0.1 if with_centers else None
  grp = groups if g > 1 else None
  kwargs = dict(centers=centers, global_mean=global_mean, ddof=ddof)
  got = nc.compute(feats, labels, w, b, grp, **kwargs)
  assert list(got) == nc.metric_names(range(g) if g > 1 else ())
  assert_metrics_close(got, reference(feats, labels, w, b, grp, **kwargs))


def test_reference_rank_k_minus_1_inverse_matches_pinv():
  """The reference's eigh-based inverse agrees with scipy's pinv here."""
  feats, labels, _, w, _ = random_problem(5, k=3)
  mu = np.stack([feats[labels == c].mean(0) for c in range(3)])
  m = mu - mu.mean(0)
  sw = np.cov(feats.T)
  pinv = np.trace(sw @ scipy.linalg.pinv(m.T @ m / 3)) / 3
  np.testing.assert_allclose(_ref_nc1(sw, mu, mu.mean(0)), pinv, rtol=1e-9)


@functools.cache
def float32_problem():
  rng = np.random.default_rng(2)
  n, d = 1 << 15, 4
  labels = rng.integers(0, 2, n)
  offset = np.where(labels[:, None] == 0, -0.2, 0.2) * np.eye(1, d)
  feats = 3.0 + offset + 0.3 * rng.standard_normal((n, d))
  return feats.astype(np.float32), labels, rng.standard_normal((2, d)), rng.standard_normal(2)


def test_float32_input_is_float64_accurate():
  feats, labels, w, b = float32_problem()
  got = nc.compute(feats, labels, w, b)
  assert_metrics_close(got, reference(feats.astype(np.float64), labels, w, b), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------
# Groups, streaming, vmap, padding, chunking.


def test_per_group_metrics_equal_compute_on_group_rows_with_global_centres():
  feats, labels, groups, w, b = random_problem(7)
  full = nc.compute(feats, labels, w, b, groups)
  means = np.stack([feats[labels == c].mean(0) for c in range(2)])
  for a in (0, 1):
    rows = groups == a
    alone = nc.compute(feats[rows], labels[rows], w, b, centers=means)
    np.testing.assert_allclose(full[f"nc1/g{a}"], alone["nc1"], rtol=1e-9)
    np.testing.assert_allclose(full[f"nc1_dist/g{a}"], alone["nc1_dist"], rtol=1e-9)
    own = nc.compute(feats[rows], labels[rows], w, b)
    np.testing.assert_allclose(full[f"nc1_own/g{a}"], own["nc1"], rtol=1e-9)
  assert full["nc1/g0"] != pytest.approx(full["nc1_own/g0"], rel=1e-3)  # the two differ


def test_group_values_name_the_keys():
  feats, labels, groups, w, b = random_problem(7)
  got = nc.compute(feats, labels, w, b, np.where(groups == 1, 7, -3))
  want = nc.compute(feats, labels, w, b, groups)
  for key in nc.GROUP_KEYS:
    assert got[f"{key}/g-3"] == want[f"{key}/g0"] and got[f"{key}/g7"] == want[f"{key}/g1"]


def _batches(feats, labels, groups, size):
  starts = range(0, len(labels), size)
  return lambda: ((feats[i : i + size], labels[i : i + size], groups[i : i + size]) for i in starts)


def test_streaming_equals_in_memory():
  feats, labels, groups, w, b = random_problem(8)
  order = np.argsort(labels, kind="stable")  # the first batches lack class 1
  feats, labels, groups = feats[order], labels[order], groups[order]
  want = nc.compute(feats, labels, w, b, groups)
  batches = _batches(feats, labels, groups, 100)
  assert_metrics_close(nc.compute_streaming(batches, w, b, num_groups=2), want)
  one_pass = nc.compute_streaming(batches, w, b, num_groups=2, second_pass=False)
  for key, value in one_pass.items():
    if key.startswith("nc1_dist") or key == "nc4":
      assert np.isnan(value), key
    else:
      np.testing.assert_allclose(value, want[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_chan_merge_equals_one_batch():
  feats, labels, groups, _, _ = random_problem(9)
  stats = jax.jit(nc.cell_stats, static_argnums=(3, 4))
  with jax.enable_x64(True):
    whole = stats(feats[:200], labels[:200], groups[:200], 2, 2)
    first = stats(feats[:100], labels[:100], groups[:100], 2, 2)
    rest = stats(feats[100:200], labels[100:200], groups[100:200], 2, 2)  # own shift
    merged = jax.jit(nc.merge)(first, rest)
  assert not np.allclose(first.shift, rest.shift)  # the merge re-bases the means
  np.testing.assert_array_equal(merged.count, whole.count)
  np.testing.assert_allclose(merged.mean + merged.shift, whole.mean + whole.shift, rtol=1e-12)
  np.testing.assert_allclose(merged.sqdev, whole.sqdev, rtol=1e-12)
  np.testing.assert_allclose(merged.scatter, whole.scatter, rtol=1e-10, atol=1e-10)


@functools.cache
def padded_problem():
  """Problem 7 plus padding rows (label -1 or group 2) full of NaN."""
  feats, labels, groups, w, b = random_problem(7)
  pad = 20
  feats_p = np.concatenate([feats, np.full((pad, feats.shape[1]), np.nan)])
  labels_p = np.concatenate([labels, np.where(np.arange(pad) % 2, -1, 0)])
  groups_p = np.concatenate([groups, np.where(np.arange(pad) % 2, 0, 2)])
  return (feats, labels, groups, w, b), (feats_p, labels_p, groups_p)


@functools.cache
def jitted_metrics_fn(chunk_size=nc.DEFAULT_CHUNK, members=False):
  fn = nc.make_metrics_fn(2, 2, chunk_size=chunk_size)
  return jax.jit(jax.vmap(fn, in_axes=(0, None, None, 0, 0)) if members else fn)


def test_padding_rows_are_ignored():
  (feats, labels, groups, w, b), (feats_p, labels_p, groups_p) = padded_problem()
  with jax.enable_x64(True):
    got = jax.device_get(jitted_metrics_fn()(feats_p, labels_p, groups_p, w, b))
  assert_metrics_close(got, nc.compute(feats, labels, w, b, groups))


def test_chunked_scan_equals_one_chunk():
  (feats, labels, groups, w, b), _ = padded_problem()
  with jax.enable_x64(True):
    got = jax.device_get(jitted_metrics_fn(chunk_size=64)(feats, labels, groups, w, b))
  assert_metrics_close(got, nc.compute(feats, labels, w, b, groups), rtol=1e-10)


def test_vmap_over_members_equals_one_at_a_time():
  (feats, _, _, w, b), (feats_p, labels_p, groups_p) = padded_problem()
  rng = np.random.default_rng(3)
  members = np.stack([feats_p, feats_p * 2 + 1, feats_p * np.linspace(0.2, 3, feats.shape[1])])
  ws = np.stack([w, -w, rng.standard_normal(w.shape)])
  bs = np.stack([b, b, rng.standard_normal(b.shape)])
  with jax.enable_x64(True):
    stacked = jax.device_get(jitted_metrics_fn(members=True)(members, labels_p, groups_p, ws, bs))
    for e in range(3):
      one = jax.device_get(jitted_metrics_fn()(members[e], labels_p, groups_p, ws[e], bs[e]))
      assert_metrics_close({k: v[e] for k, v in stacked.items()}, one, rtol=1e-10)
  assert stacked["nc1"][0] == pytest.approx(stacked["nc1"][1], rel=1e-9)  # affine invariance
  assert stacked["nc1"][0] != pytest.approx(stacked["nc1"][2], rel=1e-3)


def test_float32_collapsed_features_are_stable_without_x64():
  """Mean 100, sd 0.01 in float32: raw moments fail, the kernel does not."""
  rng = np.random.default_rng(4)
  n, d = 3000, 8
  labels = rng.integers(0, 2, n)
  groups = rng.integers(0, 2, n)
  offset = 0.02 * np.where(labels[:, None] == 0, -1, 1) * np.eye(1, d)
  feats64 = 100.0 + offset + 0.01 * rng.standard_normal((n, d))
  feats = feats64.astype(np.float32)
  w, b = rng.standard_normal((2, d)), rng.standard_normal(2)
  raw_var = (feats**2).mean(0, dtype=np.float32) - feats.mean(0, dtype=np.float32) ** 2
  assert np.max(np.abs(raw_var / 1e-4 - 1)) > 0.5  # the one-pass formula is garbage
  fn = jax.jit(nc.make_metrics_fn(2, 2, chunk_size=1024))
  got = jax.device_get(fn(feats, labels, groups, w.astype(np.float32), b.astype(np.float32)))
  assert got["nc1"].dtype == np.float32
  want = reference(feats.astype(np.float64), labels, w, b, groups)
  keys = ("nc1", "nc1_trace", "nc1_cdnv", "nc1_dist") + tuple(
      f"{key}/g{a}" for key in ("nc1", "nc1_own") for a in (0, 1)
  )
  for key in keys:
    assert got[key] > 0, key
    np.testing.assert_allclose(got[key], want[key], rtol=1e-3, err_msg=key)


# ----------------------------------------------------------------------------
# Undefined values and bad input.


def test_group_with_one_sample_has_nan_own_geometry():
  feats, labels, _, w, b = random_problem(7)
  groups = np.ones_like(labels)
  groups[0] = 0
  got = nc.compute(feats, labels, w, b, groups)
  assert np.isnan(got["nc1_own/g0"]) and np.isfinite(got["nc1_own/g1"])
  assert_metrics_close(got, reference(feats, labels, w, b, groups))  # the rest is defined


def test_missing_class_gives_nan_not_zero():
  points = [(-1.0, 0.1), (-1.0, -0.1), (-0.9, 0.0)]
  out = _two_class(points, [0, 0, 0])
  for key in ("nc1", "nc1_trace", "nc1_cdnv", "nc2_equinorm_m", "nc3", "nc4"):
    assert np.isnan(out[key]), key
  assert np.isfinite(out["nc2_etf_w"]) and np.isfinite(out["nc1_dist"])


def test_coincident_class_means_give_nan():
  out = _two_class([(-1, 0), (1, 0), (0, -1), (0, 1)], [0, 0, 1, 1])
  for key in ("nc1", "nc1_trace", "nc1_cdnv", "nc2_equinorm_m", "nc3"):
    assert np.isnan(out[key]), key


def _good():
  return np.zeros((4, 2)) + np.arange(4)[:, None], np.array([0, 0, 1, 1]), np.eye(2), np.zeros(2)


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda f, y, w, b: (f[:, 0], y, w, b), DataError),  # 1-D features
        (lambda f, y, w, b: (f, y[:3], w, b), DataError),  # label count
        (lambda f, y, w, b: (f, y + 1, w, b), DataError),  # label K
        (lambda f, y, w, b: (f, y - 1, w, b), DataError),  # label -1
        (lambda f, y, w, b: (f, y.astype(float), w, b), DataError),  # float labels
        (lambda f, y, w, b: (np.where(f == 1, np.nan, f), y, w, b), DataError),
        (lambda f, y, w, b: (np.where(f == 1, np.inf, f), y, w, b), DataError),
        (lambda f, y, w, b: (f, y, np.eye(2, 3), b), DataError),  # w has D = 3
        (lambda f, y, w, b: (f, y, w[:1], b[:1]), DataError),  # K = 1
        (lambda f, y, w, b: (f, y, w, np.zeros(3)), DataError),  # b shape
        (lambda f, y, w, b: (f, y, w * np.nan, b), DataError),
    ],
)
def test_bad_input_raises(change, error):
  with pytest.raises(error):
    nc.compute(*change(*_good()))


def test_bad_options_and_extras_raise():
  feats, labels, w, b = _good()
  with pytest.raises(DataError):
    nc.compute(feats, labels, w, b, groups=np.zeros(3, int))
  with pytest.raises(DataError):
    nc.compute(feats, labels, w, b, centers=np.zeros((2, 3)))
  with pytest.raises(ConfigError):
    nc.compute(feats, labels, w, b, global_mean="median")
  with pytest.raises(ConfigError):
    nc.compute(feats, labels, w, b, ddof=-1)
  with pytest.raises(ConfigError):
    nc.make_metrics_fn(1)
  with pytest.raises(DataError):
    nc.compute_streaming(lambda: iter(()), w, b)
  nan_batch = lambda: iter([(feats * np.nan, labels)])  # noqa: E731
  with pytest.raises(DataError):
    nc.compute_streaming(nan_batch, w, b)
  with pytest.raises(DataError):
    nc.compute_streaming(lambda: iter([(feats, labels, labels * 3)]), w, b, num_groups=2)


# ----------------------------------------------------------------------------
# Noisy samples.


def test_flipped_near_true():
  # Class 1 around +1, class 0 around -1; five flipped positives (label 0):
  # three still near +1, two already near -1.
  x = np.array([1.0, 1.2, 0.8, -1.0, -1.1, -0.9, -1.0, 0.9, 1.1, 0.7, -0.8, -1.2])
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
  flipped = np.zeros(12, bool)
  flipped[[7, 8, 9, 10, 11]] = True
  feats = np.stack([x, 0.1 * np.arange(12) % 0.3], 1)
  assert nc.flipped_near_true(feats, labels, flipped) == pytest.approx(3 / 5)
  assert np.isnan(nc.flipped_near_true(feats, labels, np.zeros(12, bool)))
  with pytest.raises(DataError):
    nc.flipped_near_true(feats, labels, flipped[:5])
  members = np.stack([feats, -feats])  # mirrored: the same fraction
  fn = jax.jit(jax.vmap(nc.flipped_near_true_kernel, in_axes=(0, None, None)))
  np.testing.assert_allclose(fn(members, labels, flipped), [3 / 5, 3 / 5], rtol=1e-6)
