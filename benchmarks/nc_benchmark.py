"""Times `ncjax.neural_collapse.compute` against a plain numpy/scipy version.

  .venv/bin/python benchmarks/nc_benchmark.py [--sizes 10000,100000] [--json PATH]

Workload: D = 512 float32 features (ReLU of Gaussians with class and group
offsets), K = 2 classes, 2 groups, every key including the per-group ones.
The reference computes the same formulas in float64 the direct way: per-class
loops, explicit D x D covariances, scipy.linalg.pinv. Every value must agree
to 1e-6 relative (1e-9 absolute for values that are 0 in exact arithmetic).

Timings are after compilation, best of --repeats. `ncjax (jax in)` gets the
features as a jax.Array already in device memory (the training loop's case);
`ncjax (numpy in)` includes the host copy of a numpy array; `ncjax f64` gets
float64 numpy features (the exact float64 path). Targets on the project's
2-core machine: >= 10x the reference, and 5x the PyTorch package
rhubarbwu/neural-collapse measured here (0.14 s at N=10k, 0.37 s at N=100k).
It takes about a minute; the machine's other load shows in the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import scipy.linalg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncjax import neural_collapse as nc  # noqa: E402  pylint: disable=wrong-import-position

RHUBARBWU_S = {10_000: 0.14, 100_000: 0.37}  # same workload, this machine


def make_problem(n: int, d: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  groups = rng.integers(0, 2, n)
  offsets = rng.standard_normal((3, d)) * 3 / np.sqrt(d)
  pre = rng.standard_normal((n, d)) + 0.5 + offsets[labels] + offsets[2] * groups[:, None]
  feats = np.maximum(pre, 0).astype(np.float32)
  return feats, labels, groups, rng.standard_normal((2, d)) / np.sqrt(d), rng.standard_normal(2)


def reference(feats, labels, w, b, groups) -> dict[str, float]:
  """SPEC section 5, written the direct way in float64."""
  h = feats.astype(np.float64)
  k, d = w.shape

  def class_means(rows):
    return np.stack([h[rows & (labels == c)].mean(0) for c in range(k)])

  def within(rows, mu):
    s = np.zeros((d, d))
    for c in range(k):
      r = h[rows & (labels == c)] - mu[c]
      s += r.T @ r
    return s / rows.sum()

  def nc1(sw, mu):
    m = mu - mu.mean(0)
    return np.trace(sw @ scipy.linalg.pinv(m.T @ m / k)) / k

  def nc2(v):
    norms = np.linalg.norm(v, axis=1)
    cos = np.array([v[i] @ v[j] / (norms[i] * norms[j]) for i in range(k) for j in range(i + 1, k)])
    gram = v @ v.T
    etf = (np.eye(k) - 1 / k) / np.sqrt(k - 1)
    return {
        "equinorm": norms.std() / norms.mean(), "equiangular": cos.std(),
        "maxangle": np.mean(np.abs(cos + 1 / (k - 1))),
        "etf": np.linalg.norm(gram / np.linalg.norm(gram) - etf),
    }  # fmt: skip

  everyone = np.ones(len(h), bool)
  mu = class_means(everyone)
  m = mu - mu.mean(0)
  sw = within(everyone, mu)
  out = {"nc1": nc1(sw, mu), "nc1_trace": np.trace(sw) / np.trace(m.T @ m / k)}
  dist = np.stack([np.linalg.norm(h - mu[c], axis=1) for c in range(k)], 1)
  own = dist[np.arange(len(h)), labels]
  var = [np.mean(own[labels == c] ** 2) for c in range(k)]
  out["nc1_cdnv"] = (var[0] + var[1]) / (2 * np.sum((mu[0] - mu[1]) ** 2))
  out["nc1_dist"] = own.mean()
  for name, v in (("w", w), ("m", m)):
    out.update({f"nc2_{key}_{name}": val for key, val in nc2(v).items()})
  out["nc3"] = np.sum((w / np.linalg.norm(w) - m / np.linalg.norm(m)) ** 2)
  wm = w @ m.T
  out["nc3_wh"] = np.linalg.norm(wm / np.linalg.norm(wm) - (np.eye(k) - 1 / k) / np.sqrt(k - 1))
  out["nc4"] = np.mean(np.argmax(h @ w.T + b, 1) != np.argmin(dist, 1))
  for a in (0, 1):
    rows = groups == a
    out[f"nc1/g{a}"] = nc1(within(rows, mu), mu)
    out[f"nc1_dist/g{a}"] = own[rows].mean()
    mu_a = class_means(rows)
    out[f"nc1_own/g{a}"] = nc1(within(rows, mu_a), mu_a)
  return out


def best_time(fn, repeats: int) -> tuple[float, object]:
  result, times = None, []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return min(times), result


def max_rel_error(got: dict[str, float], want: dict[str, float]) -> tuple[float, bool]:
  worst, ok = 0.0, True
  for key, ref in want.items():
    err = abs(got[key] - ref)
    ok &= err <= 1e-6 * abs(ref) + 1e-9
    if abs(ref) > 1e-9:
      worst = max(worst, err / abs(ref))
  return worst, ok


def run(n: int, d: int, repeats: int) -> dict[str, object]:
  feats, labels, groups, w, b = make_problem(n, d)
  ref_s, ref = best_time(lambda: reference(feats, labels, w, b, groups), max(1, repeats // 3))
  row: dict[str, object] = {"n": n, "d": d, "reference_s": ref_s}
  with jax.enable_x64(True):
    on_device = jax.device_put(feats)
  variants = {"jax_in": on_device, "numpy_in": feats, "f64_numpy_in": feats.astype(np.float64)}
  for name, x in variants.items():
    call = lambda x=x: nc.compute(x, labels, w, b, groups)  # noqa: E731
    call()  # compile
    seconds, got = best_time(call, repeats)
    err, ok = max_rel_error(got, ref)
    row[f"{name}_s"] = seconds
    row[f"{name}_max_rel_err"] = err
    row[f"{name}_matches"] = bool(ok)
  # The in-training pass: the jitted float32 kernel train.py runs every epoch
  # (x64 off, features already on the device).
  kernel = jax.jit(nc.make_metrics_fn(num_classes=2, num_groups=2))
  args = [jax.device_put(a) for a in (feats, labels, groups, w, b)]
  train_call = lambda: jax.block_until_ready(kernel(*args))  # noqa: E731
  train_call()  # compile
  seconds, got = best_time(train_call, repeats)
  got = {k: float(v) for k, v in got.items()}
  row["in_training_s"] = seconds
  row["in_training_max_rel_err"] = max_rel_error(got, ref)[0]
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="10000,100000")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", default=None, help="write the results here")
  args = parser.parse_args(argv)
  rows = [run(int(s), args.dim, args.repeats) for s in args.sizes.split(",")]
  header = (
      f"{'N':>7} {'reference':>10} {'jax in':>9} {'numpy in':>9} {'f64 in':>9}"
      f" {'x ref':>7} {'target':>8} {'x rhubarbwu':>11} {'max rel err':>11} match"
      f" {'in-train f32':>12} {'its rel err':>11}"
  )
  print(f"D = {args.dim}, K = 2, 2 groups; seconds, best of {args.repeats}")
  print(header)
  ok = True
  for r in rows:
    rhub = RHUBARBWU_S.get(r["n"])
    target = rhub / 5 if rhub else float("nan")
    r["speedup_vs_reference"] = r["reference_s"] / r["jax_in_s"]
    r["target_s"] = target
    r["speedup_vs_rhubarbwu"] = rhub / r["jax_in_s"] if rhub else None
    matches = r["jax_in_matches"] and r["numpy_in_matches"] and r["f64_numpy_in_matches"]
    ok &= matches
    err = max(r["jax_in_max_rel_err"], r["numpy_in_max_rel_err"], r["f64_numpy_in_max_rel_err"])
    rhub_x = r["speedup_vs_rhubarbwu"] or float("nan")
    print(
        f"{r['n']:>7} {r['reference_s']:>10.3f} {r['jax_in_s']:>9.4f} {r['numpy_in_s']:>9.4f}"
        f" {r['f64_numpy_in_s']:>9.4f} {r['speedup_vs_reference']:>7.1f} {target:>8.3f}"
        f" {rhub_x:>11.1f} {err:>11.1e} {'yes' if matches else 'NO':>5}"
        f" {r['in_training_s']:>12.4f} {r['in_training_max_rel_err']:>11.1e}"
    )
  if args.json:
    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
            "machine": platform.platform(), "load_avg": os.getloadavg()}  # fmt: skip
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=2)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
