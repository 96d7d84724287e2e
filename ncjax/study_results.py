"""A finished study's numbers: per-seed results, tests and curves (SPEC 6-7).

A study directory holds one training workdir per dataset-attribute
combination and, beside it, the subgroup-separability runs:

  STUDY/combos/<combo>/        members = seeds x bias rates (0.0 = clean)
  STUDY/separability/<combo>/  attribute models, members = seeds x (0.0,)

`summarize` reads them (metrics.jsonl, stage_eval.jsonl, train_summary.json,
config.json) and returns one JSON-safe dict, written by `write_summary` to
STUDY/summary.json, from which `ncjax.report` draws every figure, table and
sentence. Its shape (NaN -> null, per-seed lists ordered as "seeds"):

  combos.<combo>:
    seeds, rates, main_rate, groups, dataset, attribute, epochs
    separability_auc: [per seed of the separability run]   its test AUC
      at stage 'early' ([] without a separability run)
    stages.<early|final>:
      clean|biased: f1.<g>, nc1_test.<g>: [per seed]; split_auc, f1_all: [..]
      mannwhitney_f1.<g>: {p, p_holm, u, method, n}   biased vs clean
      delta_f1.<g>, delta_nc1_test.<g>: `statistics.Delta` fields
    by_rate.<rate>.<stage>: f1.<g>, nc1_test.<g>, delta_f1.<g>,
      delta_nc1_test.<g>, mannwhitney_f1.<g>   every nonzero rate
    early_stop: best epoch per seed for clean / biased, and their means
    curves.<split>.<key>: {epochs, clean|biased: {mean, sd, n}, by_rate}
    findings: the numbers the report's sentences state (see `_findings`)
  kendall_tau.<stage>: {tau, p, n, method, reason, combos, separability,
    split}   mean separability AUC vs mean SPLIT AUC of the biased models
  kendall_tau_clean.<stage>: the same for the clean models
  skipped: combinations without a stage evaluation (left out)

"biased" is the main rate (the largest nonzero rate unless `main_rate` is
given); every nonzero rate has its entry in `by_rate`. Holm's adjustment runs
over the tests of one figure: Fig. 4 (per stage, combos x groups at the main
rate), and the delta-F1-vs-rate figure (per stage, combos x groups x rates).

`select_combos` and `add_curves` make views of a summary (some combinations;
curves of metrics the summary does not keep) for `colabs/report.ipynb`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ncjax import statistics
from ncjax.metric_writers import read_records

SUMMARY_FILE = "summary.json"
EVAL_FILE = "stage_eval.jsonl"  # as ncjax.evaluate writes it
STAGES = ("early", "final")
SPLITS = ("train", "validation", "test")
# Per-epoch metrics whose curves the summary keeps (all others stay in the
# workdirs): the NC1-4 family, per-group NC1, losses and the Fig. 1 metric.
CURVE_KEYS = (
    "loss",
    "batch_loss",
    "accuracy",
    "accuracy/g0",
    "accuracy/g1",
    "nc1",
    "nc1_trace",
    "nc1_cdnv",
    "nc1_dist",
    "nc1/g0",
    "nc1/g1",
    "nc1_dist/g0",
    "nc1_dist/g1",
    "nc2_equinorm_w",
    "nc2_equiangular_w",
    "nc2_maxangle_w",
    "nc2_etf_w",
    "nc3",
    "nc4",
    "flipped_near_true",
)


def rate_name(rate: float) -> str:
  """The key of a bias rate in `by_rate` ('0.25'), as in member names."""
  return f"{rate:g}"


def jsonable(value: Any) -> Any:
  """`value` with NaN/inf -> None, numpy -> Python, tuples -> lists."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _f(value: Any) -> float:
  return math.nan if value is None else float(value)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  return read_records(path) if os.path.exists(path) else []


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _subdirs(path: str) -> list[str]:
  if not os.path.isdir(path):
    return []
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def _groups(evals: Iterable[dict[str, Any]]) -> list[str]:
  keys = {k.split("/")[1] for r in evals for k in r if k.startswith("f1/g")}
  return sorted(keys, key=lambda g: int(g[1:]))


def _per_seed(rows: dict[int, dict[str, Any]], seeds: Sequence[int], key: str) -> list[float]:
  """rows[seed][key] in seed order; NaN where the member or value is missing."""
  return [_f(rows.get(s, {}).get(key)) for s in seeds]


def mean_sd(values: Sequence[float | None]) -> tuple[float, float, int]:
  """(mean, sd with ddof=1, count) of the non-NaN, non-None values."""
  v = np.asarray([_f(x) for x in values], np.float64)
  v = v[np.isfinite(v)]
  mean = float(v.mean()) if v.size else math.nan
  sd = float(v.std(ddof=1)) if v.size >= 2 else math.nan  # seeds are a sample
  return mean, sd, int(v.size)


def _mean_sd_dict(values: Sequence[float | None]) -> dict[str, float]:
  return dict(zip(("mean", "sd", "n"), mean_sd(values), strict=True))


# ------------------------------------------------------------------ stages


def _stage_block(rows, seeds, groups) -> dict[str, Any]:
  """Per-seed test results of one (stage, rate): F1, test NC1, SPLIT AUC."""
  return {
      "f1": {g: _per_seed(rows, seeds, f"f1/{g}") for g in groups},
      "nc1_test": {g: _per_seed(rows, seeds, f"test_nc1/{g}") for g in groups},
      "split_auc": _per_seed(rows, seeds, "split_auc"),
      "f1_all": _per_seed(rows, seeds, "f1"),
  }


def _mwu(biased, clean, alternative) -> dict[str, Any]:
  r = statistics.mann_whitney(biased, clean, alternative=alternative)
  return {
      "p": r.pvalue,
      "p_holm": math.nan,
      "u": r.statistic,
      "method": r.method,
      "n": list(r.n),
      "reason": r.reason,
  }


def _delta(biased, clean) -> dict[str, Any]:
  d = statistics.delta(biased, clean)
  return {k: getattr(d, k) for k in d.__dataclass_fields__}


def _compare(clean, biased, groups, alternative) -> dict[str, Any]:
  return {
      "mannwhitney_f1": {g: _mwu(biased["f1"][g], clean["f1"][g], alternative) for g in groups},
      "delta_f1": {g: _delta(biased["f1"][g], clean["f1"][g]) for g in groups},
      "delta_nc1_test": {g: _delta(biased["nc1_test"][g], clean["nc1_test"][g]) for g in groups},
  }


# ------------------------------------------------------------------ curves


def _curves(
    records,
    rate_of_group: dict[str, float],
    rates: Sequence[float],
    keys: Sequence[str] = CURVE_KEYS,
) -> dict[str, Any]:
  """Mean and sd over seeds per epoch, per split, key and bias group.

  Epochs where a key was not measured (NC every `config.nc.every` epochs) are
  left out of that key's curve.
  """
  cells: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
  for r in records:
    cells.setdefault((r["split"], r["epoch"], float(r["bias_rate"])), []).append(r)
  all_epochs = sorted({r["epoch"] for r in records})
  many_rates = len([r for r in rates if r > 0]) > 1
  out: dict[str, Any] = {}
  for split in SPLITS:
    per_split = {}
    for key in keys:
      epochs = [
          e
          for e in all_epochs
          if any(r.get(key) is not None for rate in rates for r in cells.get((split, e, rate), ()))
      ]
      if not epochs:
        continue

      def stats_for(rate, key=key, epochs=epochs, split=split):
        cols = {"mean": [], "sd": [], "n": []}
        for e in epochs:
          vals = [_f(r.get(key)) for r in cells.get((split, e, rate), ())]
          for name, v in _mean_sd_dict(vals).items():
            cols[name].append(v)
        return cols

      curve: dict[str, Any] = {"epochs": epochs}
      curve.update({name: stats_for(rate) for name, rate in rate_of_group.items()})
      if many_rates:
        curve["by_rate"] = {rate_name(r): stats_for(r) for r in rates}
      per_split[key] = curve
    out[split] = per_split
  return out


def _value_at(records, split, key, epoch, rate, seeds) -> list[float]:
  rows = {
      r["seed"]: r
      for r in records
      if r["split"] == split and r["epoch"] == epoch and r["bias_rate"] == rate
  }
  return _per_seed(rows, seeds, key)


def _nearest(epochs: Sequence[int], target: float) -> int:
  return min(epochs, key=lambda e: (abs(e - target), e))


def _findings(records, curves, early_stop, seeds, main_rate, alternative) -> dict[str, Any]:
  """The facts the report states about training dynamics (paper 4.2, Fig. 1).

  train_nc1_at_early_stop: per-seed train NC1 of clean and biased models at
    the measured epoch nearest the mean early-stop epoch, and Mann-Whitney.
  train_nc1_first_last: mean train NC1 at the first and last measured epoch.
  flipped_near_true: biased members' fraction of flipped samples nearer the
    true-class mean, at their mean early-stop epoch and at the last epoch.
  """
  out: dict[str, Any] = {}
  nc1 = curves.get("train", {}).get("nc1")
  if nc1 and math.isfinite(early_stop["mean"]):
    epoch = _nearest(nc1["epochs"], early_stop["mean"])
    clean = _value_at(records, "train", "nc1", epoch, 0.0, seeds)
    biased = _value_at(records, "train", "nc1", epoch, main_rate, seeds)
    out["train_nc1_at_early_stop"] = {
        "epoch": epoch,
        "clean": clean,
        "biased": biased,
        "delta": _delta(biased, clean),
        "mannwhitney": _mwu(biased, clean, alternative),
    }
    out["train_nc1_first_last"] = {
        "first_epoch": nc1["epochs"][0],
        "last_epoch": nc1["epochs"][-1],
        **{
            g: {"first": nc1[g]["mean"][0], "last": nc1[g]["mean"][-1]} for g in ("clean", "biased")
        },
    }
  flipped = curves.get("train", {}).get("flipped_near_true")
  if flipped and math.isfinite(early_stop["mean_biased"]):
    epoch = _nearest(flipped["epochs"], early_stop["mean_biased"])
    at_early = _value_at(records, "train", "flipped_near_true", epoch, main_rate, seeds)
    last = flipped["epochs"][-1]
    at_last = _value_at(records, "train", "flipped_near_true", last, main_rate, seeds)
    out["flipped_near_true"] = {
        "early_epoch": epoch,
        "final_epoch": last,
        "early": _mean_sd_dict(at_early),
        "final": _mean_sd_dict(at_last),
    }
  return out


# ------------------------------------------------------------------ combos


def _config(workdir: str) -> dict[str, Any]:
  return _read_json(os.path.join(workdir, "config.json")).get("config", {})


def _separability(study_dir: str, name: str) -> list[float]:
  evals = _read_jsonl(os.path.join(study_dir, "separability", name, EVAL_FILE))
  rows = {r["seed"]: r for r in evals if r["stage"] == "early" and r["bias_rate"] == 0.0}
  return _per_seed(rows, sorted(rows), "auc")


def summarize_combo(
    study_dir: str,
    name: str,
    *,
    alternative: statistics.Alternative = "two-sided",
    main_rate: float | None = None,
) -> dict[str, Any]:
  """One combination's entry of the summary (p_holm still NaN)."""
  workdir = os.path.join(study_dir, "combos", name)
  config = _config(workdir)
  evals = _read_jsonl(os.path.join(workdir, EVAL_FILE))
  if not evals:
    raise FileNotFoundError(f"{workdir} has no stage_eval.jsonl: run ncjax.evaluate first")
  records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  rates = sorted({float(r["bias_rate"]) for r in evals})
  biased_rates = [r for r in rates if r > 0]
  if 0.0 not in rates or not biased_rates:
    raise ValueError(f"{workdir} needs clean (0.0) and biased members, has rates {rates}")
  main = max(biased_rates) if main_rate is None else float(main_rate)
  if main not in biased_rates:
    raise ValueError(f"main_rate {main} is not a biased rate of {workdir}: {biased_rates}")
  seeds = sorted({int(r["seed"]) for r in evals})
  groups = _groups(evals)

  def rows(stage, rate):
    return {r["seed"]: r for r in evals if r["stage"] == stage and r["bias_rate"] == rate}

  stages, by_rate = {}, {rate_name(r): {} for r in biased_rates}
  for stage in STAGES:
    clean = _stage_block(rows(stage, 0.0), seeds, groups)
    blocks = {r: _stage_block(rows(stage, r), seeds, groups) for r in biased_rates}
    stages[stage] = {"clean": clean, "biased": blocks[main]}
    stages[stage].update(_compare(clean, blocks[main], groups, alternative))
    for r in biased_rates:
      entry = {"f1": blocks[r]["f1"], "nc1_test": blocks[r]["nc1_test"]}
      entry.update(_compare(clean, blocks[r], groups, alternative))
      by_rate[rate_name(r)][stage] = entry

  best = _read_json(os.path.join(workdir, "train_summary.json")).get("members", {})
  best_rows = {
      rate: {
          r["seed"]: {"e": best.get(r["member"], {}).get("best_epoch")}
          for r in evals
          if r["bias_rate"] == rate
      }
      for rate in (0.0, main)
  }
  early_stop = {
      "clean": _per_seed(best_rows[0.0], seeds, "e"),
      "biased": _per_seed(best_rows[main], seeds, "e"),
  }
  early_stop["mean"] = mean_sd(early_stop["clean"] + early_stop["biased"])[0]
  early_stop["mean_clean"] = mean_sd(early_stop["clean"])[0]
  early_stop["mean_biased"] = mean_sd(early_stop["biased"])[0]

  curves = _curves(records, {"clean": 0.0, "biased": main}, rates)
  dataset = config.get("dataset", {})
  return {
      "dataset": dataset.get("name", name.split("-")[0]),
      "attribute": dataset.get("attribute", name.split("-")[-1]),
      "epochs": config.get("epochs", max((r["epoch"] for r in records), default=0)),
      "seeds": seeds,
      "rates": rates,
      "main_rate": main,
      "groups": groups,
      "separability_auc": _separability(study_dir, name),
      "stages": stages,
      "by_rate": by_rate,
      "early_stop": early_stop,
      "curves": curves,
      "findings": _findings(records, curves, early_stop, seeds, main, alternative),
  }


def _holm_fill(tests: list[dict[str, Any]]) -> None:
  adjusted = statistics.holm([t["p"] for t in tests])
  for t, p in zip(tests, adjusted, strict=True):
    t["p_holm"] = float(p)


def _kendall(combos: dict[str, Any], stage: str, side: str) -> dict[str, Any]:
  names, x, y = [], [], []
  for name, c in combos.items():
    names.append(name)
    x.append(mean_sd(c["separability_auc"])[0])
    y.append(mean_sd(c["stages"][stage][side]["split_auc"])[0])
  r = statistics.kendall_tau(x, y)
  return {
      "tau": r.statistic,
      "p": r.pvalue,
      "n": r.n[0],
      "method": r.method,
      "reason": r.reason,
      "combos": names,
      "separability": x,
      "split": y,
  }


def summarize(
    study_dir: str,
    *,
    alternative: statistics.Alternative = "two-sided",
    alpha: float = 0.05,
    main_rate: float | None = None,
) -> dict[str, Any]:
  """Everything the report needs from a study directory; see the module doc.

  Args:
    study_dir: the STUDY directory (with combos/ and separability/).
    alternative: of the Mann-Whitney tests (biased vs clean), as in
      `statistics.mann_whitney`.
    alpha: significance level recorded for the report's '*' markers.
    main_rate: the biased rate reported as "biased"; default the largest
      nonzero rate of each combination.

  Returns:
    The JSON-safe summary dict (NaN -> None).
  """
  root = os.path.join(study_dir, "combos")
  names = _subdirs(root)
  # An unfinished combination (no stage evaluation yet) is listed as skipped
  # rather than failing the report of the finished ones.
  skipped = [n for n in names if not os.path.exists(os.path.join(root, n, EVAL_FILE))]
  names = [n for n in names if n not in skipped]
  if not names:
    raise FileNotFoundError(f"no evaluated combinations under {root} (skipped: {skipped})")
  combos = {
      n: summarize_combo(study_dir, n, alternative=alternative, main_rate=main_rate) for n in names
  }
  for stage in STAGES:
    _holm_fill([t for c in combos.values() for t in c["stages"][stage]["mannwhitney_f1"].values()])
    _holm_fill(
        [
            t
            for c in combos.values()
            for r in c["by_rate"].values()
            for t in r[stage]["mannwhitney_f1"].values()
        ]
    )
  summary = {
      "study_dir": os.path.abspath(study_dir),
      "alternative": alternative,
      "alpha": alpha,
      "holm_families": {
          "stages.<stage>.mannwhitney_f1": "per stage: all combos x groups (Fig. 4)",
          "by_rate.<rate>.<stage>.mannwhitney_f1": "per stage: all combos x groups x rates",
      },
      "combos": combos,
      "skipped": skipped,
      "kendall_tau": {s: _kendall(combos, s, "biased") for s in STAGES},
      "kendall_tau_clean": {s: _kendall(combos, s, "clean") for s in STAGES},
  }
  return jsonable(summary)


def write_summary(study_dir: str, **kwargs) -> str:
  """Writes `summarize(study_dir, **kwargs)` to STUDY/summary.json; its path."""
  summary = summarize(study_dir, **kwargs)
  path = os.path.join(study_dir, SUMMARY_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1, allow_nan=False)
  os.replace(tmp, path)
  return path


def load_summary(study_dir: str) -> dict[str, Any]:
  """STUDY/summary.json as written by `write_summary` (None stands for NaN)."""
  with open(os.path.join(study_dir, SUMMARY_FILE)) as f:
    return json.load(f)


# ------------------------------------------------------------- views (colabs)


def select_combos(summary: dict[str, Any], names: Sequence[str] | None) -> dict[str, Any]:
  """The summary of the combinations `names` only (in that order); None = all.

  Kendall's tau is recomputed over the selected combinations; Holm-adjusted
  p-values stay those of the whole study's families.
  """
  if names is None:
    return summary
  unknown = [n for n in names if n not in summary["combos"]]
  if unknown:
    raise KeyError(f"no combination {unknown} in the summary; valid: {list(summary['combos'])}")
  combos = {n: summary["combos"][n] for n in names}
  return {
      **summary,
      "combos": combos,
      "kendall_tau": jsonable({s: _kendall(combos, s, "biased") for s in STAGES}),
      "kendall_tau_clean": jsonable({s: _kendall(combos, s, "clean") for s in STAGES}),
  }


def add_curves(
    summary: dict[str, Any], study_dir: str, curves: Iterable[tuple[str, str]]
) -> dict[str, Any]:
  """The summary with the (split, key) curves it lacks, from metrics.jsonl.

  The summary keeps only `CURVE_KEYS`; any other logged metric (e.g.
  'nc1_own/g1', 'nc2_etf_m') is summarised here the same way: mean and sd
  over seeds per epoch, clean and biased at the combination's main rate.
  """
  wanted = list(curves)
  combos = {}
  for name, c in summary["combos"].items():
    missing = sorted({k for split, k in wanted if k not in c["curves"].get(split, {})})
    if not missing:
      combos[name] = c
      continue
    records = _read_jsonl(os.path.join(study_dir, "combos", name, "metrics.jsonl"))
    new = jsonable(
        _curves(records, {"clean": 0.0, "biased": c["main_rate"]}, c["rates"], keys=missing)
    )
    merged = {split: dict(c["curves"].get(split, {})) for split in SPLITS}
    for split, key in wanted:
      if key not in merged[split] and key in new.get(split, {}):
        merged[split][key] = new[split][key]
    combos[name] = {**c, "curves": merged}
  return {**summary, "combos": combos}
