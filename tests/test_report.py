"""Study summary and report: a tiny trained study and a fabricated one.

The tiny study (two synthetic attributes, trained and evaluated for real)
checks the whole path from workdirs to report.md. The fabricated study
(random numbers written in the workdir formats, no training) has enough
combinations for Kendall's tau and several bias rates. Every statistic is
recomputed here with scipy from the workdir files, not from the summary.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct

import numpy as np
import pytest
from scipy import stats

from configs import synthetic as synthetic_config
from ncjax import evaluate, report, study_results, train

ATTRS = ("low", "high")
SEEDS = (0, 1)
GROUPS = ("g0", "g1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------- studies


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, data_dir):
  """STUDY dir of two tiny trained combinations with separability runs."""
  root = str(tmp_path_factory.mktemp("study"))
  for attr in ATTRS:
    for kind in ("combos", "separability"):
      config = synthetic_config.get_config("tiny")
      config.dataset.data_dir = data_dir
      config.dataset.attribute = attr
      config.seeds = SEEDS
      config.epochs = 3
      config.bias.rates = (0.0, 0.25)
      if kind == "separability":
        config.target = attr
        config.bias.rates = (0.0,)
        config.nc.every = config.epochs  # as ncjax.study: only the AUC is used
      workdir = os.path.join(root, kind, f"synthetic-{attr}")
      train.train_and_evaluate(config, workdir)
      evaluate.run(workdir)
  return root, report.write_report(root)


def _write_jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def fake_study(root, *, combos=4, seeds=(0, 1, 2, 3), rates=(0.0, 0.1, 0.25, 0.5), epochs=12):
  """Writes a study whose numbers are random but shaped like a real one.

  NC keys are logged every other epoch (and at the last), like nc.every=2;
  one member's group-0 F1 is null (NaN) to exercise the NaN handling; one
  combination has not been evaluated yet (no stage_eval.jsonl).
  """
  os.makedirs(os.path.join(root, "combos", "fake-unfinished"))
  rng = np.random.default_rng(0)
  for i in range(combos):
    attr = f"attr{i}"
    name = f"fake-{attr}"
    workdir = os.path.join(root, "combos", name)
    os.makedirs(workdir)
    config = {
        "dataset": {"name": "fake", "attribute": attr},
        "epochs": epochs,
        "seeds": list(seeds),
        "bias": {"rates": list(rates)},
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"config": config, "overrides": {}}, f)
    records, evals, best = [], [], {}
    for rate, seed in itertools.product(rates, seeds):
      member = f"seed{seed}_bias{rate:g}"
      best[member] = {"best_epoch": int(rng.integers(2, 5))}
      for epoch, split in itertools.product(range(1, epochs + 1), ("train", "validation", "test")):
        r = {
            "epoch": epoch,
            "member": member,
            "seed": seed,
            "bias_rate": rate,
            "split": split,
            "loss": float(rng.random()),
            "accuracy": float(rng.random()),
        }
        if epoch % 2 == 0 or epoch == epochs:
          nc1 = (1 + 4 * rate) * 10 * math.exp(-epoch / 3) * (1 + 0.2 * rng.random())
          r.update(
              {
                  "nc1": nc1,
                  "nc1/g0": nc1,
                  "nc1/g1": nc1 * 1.1,
                  "nc2_equinorm_w": 0.1 * rng.random(),
                  "nc2_etf_w": rng.random(),
                  "nc3": rng.random(),
                  "nc4": 0.1 * rng.random(),
              }
          )
          if split == "train" and rate > 0:
            r["flipped_near_true"] = max(0.0, 0.9 - epoch / epochs + 0.1 * rng.random())
        records.append(r)
      for stage in ("early", "final"):
        shift = rate * (0.1 if stage == "early" else 0.4)
        e = {
            "member": member,
            "seed": seed,
            "bias_rate": rate,
            "stage": stage,
            "f1": 0.8 - shift + 0.05 * rng.random(),
            "split_auc": 0.5 + 0.07 * i + 0.1 * rng.random(),
        }
        for g in GROUPS:
          e[f"f1/{g}"] = 0.8 - shift + 0.05 * rng.random()
          e[f"test_nc1/{g}"] = 1 + 3 * shift + rng.random()
        if (i, rate, seed, stage) == (0, 0.0, 1, "final"):
          e["f1/g0"] = None
        evals.append(e)
    _write_jsonl(os.path.join(workdir, "metrics.jsonl"), records)
    _write_jsonl(os.path.join(workdir, "stage_eval.jsonl"), evals)
    with open(os.path.join(workdir, "train_summary.json"), "w") as f:
      json.dump({"members": best}, f)
    sep = os.path.join(root, "separability", name)
    os.makedirs(sep)
    _write_jsonl(
        os.path.join(sep, "stage_eval.jsonl"),
        [
            {
                "member": f"seed{s}_bias0",
                "seed": s,
                "bias_rate": 0.0,
                "stage": stage,
                "auc": 0.55 + 0.07 * i + 0.05 * rng.random(),
            }
            for s in seeds
            for stage in ("early", "final")
        ],
    )
  return root


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  root = fake_study(str(tmp_path_factory.mktemp("fake_study")))
  return root, report.write_report(root)


# ------------------------------------------------- independent recomputation


def _evals(workdir):
  with open(os.path.join(workdir, "stage_eval.jsonl")) as f:
    return [json.loads(line) for line in f]


def _per_seed(evals, stage, rate, key):
  rows = {r["seed"]: r for r in evals if r["stage"] == stage and r["bias_rate"] == rate}
  return [math.nan if rows[s][key] is None else rows[s][key] for s in sorted(rows)]


def _mwu_p(biased, clean, alternative="two-sided"):
  biased = [v for v in biased if not math.isnan(v)]
  clean = [v for v in clean if not math.isnan(v)]
  return stats.mannwhitneyu(biased, clean, alternative=alternative).pvalue


def _holm_reference(pvalues):
  """Holm's step-down procedure written out by its definition."""
  m = len(pvalues)
  order = sorted(range(m), key=lambda i: pvalues[i])
  adjusted, running = [0.0] * m, 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * pvalues[i]))
    adjusted[i] = running
  return adjusted


def _close(a, b):
  if a is None or (isinstance(a, float) and math.isnan(a)):
    return b is None or math.isnan(b)
  return b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _check_f1_tests(root, summary, *, alternative="two-sided"):
  """Per-seed F1, Mann-Whitney p and Holm p against scipy, for every stage."""
  for stage in ("early", "final"):
    raw, held = [], []
    for name, c in summary["combos"].items():
      evals = _evals(os.path.join(root, "combos", name))
      main = max(r["bias_rate"] for r in evals)
      for g in GROUPS:
        clean = _per_seed(evals, stage, 0.0, f"f1/{g}")
        biased = _per_seed(evals, stage, main, f"f1/{g}")
        got = c["stages"][stage]
        assert all(map(_close, got["clean"]["f1"][g], clean))
        assert all(map(_close, got["biased"]["f1"][g], biased))
        p = _mwu_p(biased, clean, alternative)
        assert _close(got["mannwhitney_f1"][g]["p"], p)
        raw.append(p)
        held.append(got["mannwhitney_f1"][g]["p_holm"])
    assert all(map(_close, held, _holm_reference(raw)))


# -------------------------------------------------------------- tiny study

REQUIRED = {
    "f1": GROUPS,
    "nc1_test": GROUPS,
    "split_auc": None,
}


def test_summary_has_the_required_shape(tiny_study):
  root, _ = tiny_study
  with open(os.path.join(root, "summary.json")) as f:
    summary = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  n = len(SEEDS)
  assert set(summary["combos"]) == {f"synthetic-{a}" for a in ATTRS}
  for c in summary["combos"].values():
    assert len(c["separability_auc"]) == n
    assert set(c["stages"]) == {"early", "final"}
    for stage in c["stages"].values():
      for side in ("clean", "biased"):
        for key, groups in REQUIRED.items():
          value = stage[side][key]
          if groups is None:
            assert len(value) == n
          else:
            assert set(value) == set(groups) and all(len(value[g]) == n for g in groups)
      assert set(stage["mannwhitney_f1"]) == set(GROUPS)
      for test in stage["mannwhitney_f1"].values():
        assert {"p", "p_holm"} <= set(test)
    assert set(c["by_rate"]) == {"0.25"}
    assert c["curves"]["train"]["nc1"]["epochs"] == [1, 2, 3]
  assert set(summary["kendall_tau"]) == {"early", "final"}
  for t in summary["kendall_tau"].values():
    assert {"tau", "p"} <= set(t)


def test_statistics_match_scipy_on_trained_study(tiny_study):
  root, _ = tiny_study
  summary = study_results.load_summary(root)
  _check_f1_tests(root, summary)
  for name, c in summary["combos"].items():
    sep = _evals(os.path.join(root, "separability", name))
    assert all(map(_close, c["separability_auc"], _per_seed(sep, "early", 0.0, "auc")))
  # Two combinations: tau of 2 points is always +-1, so none is reported.
  for t in summary["kendall_tau"].values():
    assert t["tau"] is None and t["n"] == 2 and "at least 3" in t["reason"]


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(24)
  width, height = struct.unpack(">II", head[16:24])
  return head[:8] == PNG_MAGIC and width >= 600 and height >= 300 and os.path.getsize(path) > 10_000


def _check_report(report_path, expected_files):
  out = os.path.dirname(report_path)
  for file in expected_files:
    assert _is_png(os.path.join(out, file)), file
  with open(report_path) as f:
    text = f.read()
  embedded = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
  pngs = {f for f in os.listdir(out) if f.endswith(".png")}
  assert embedded == pngs and set(expected_files) <= pngs
  assert re.search(r"p = \d\.\d{3}", text) and re.search(r"\d\.\d+ ± \d", text)
  return text


def test_figures_and_report(tiny_study):
  root, report_path = tiny_study
  files = [f for _, _, f, _, _ in report.CURVE_FIGURES]
  files += [report.FIG1_FILE, report.FIG3_FILE, report.FIG4_FILE]
  text = _check_report(report_path, files)
  assert not os.path.exists(os.path.join(root, "report", report.RATE_FILE))
  assert "synthetic-low" in text and "synthetic-high" in text
  for table in ("table_fairness.csv", "table_split.csv"):
    with open(os.path.join(root, "report", table)) as f:
      rows_per_stage = len(GROUPS) if table == "table_fairness.csv" else 1
      assert len(f.read().splitlines()) == 1 + len(ATTRS) * 2 * rows_per_stage


# ---------------------------------------------------------- fabricated study


def test_fabricated_study_statistics(fake):
  root, _ = fake
  summary = study_results.load_summary(root)
  assert summary["skipped"] == ["fake-unfinished"]
  _check_f1_tests(root, summary)
  names = list(summary["combos"])
  assert len(names) == 4
  for stage in ("early", "final"):
    sep, split = [], []
    for name in names:
      sep_evals = _evals(os.path.join(root, "separability", name))
      sep.append(np.mean(_per_seed(sep_evals, "early", 0.0, "auc")))
      evals = _evals(os.path.join(root, "combos", name))
      split.append(np.mean(_per_seed(evals, stage, 0.5, "split_auc")))
    expected = stats.kendalltau(sep, split)
    got = summary["kendall_tau"][stage]
    assert _close(got["tau"], expected.statistic) and _close(got["p"], expected.pvalue)
    # Holm over every (combo, group, rate) of the rate figure.
    raw, held = [], []
    for name in names:
      evals = _evals(os.path.join(root, "combos", name))
      for rate, g in itertools.product(("0.1", "0.25", "0.5"), GROUPS):
        test = summary["combos"][name]["by_rate"][rate][stage]["mannwhitney_f1"][g]
        p = _mwu_p(
            _per_seed(evals, stage, float(rate), f"f1/{g}"), _per_seed(evals, stage, 0.0, f"f1/{g}")
        )
        assert _close(test["p"], p)
        raw.append(p)
        held.append(test["p_holm"])
    assert all(map(_close, held, _holm_reference(raw)))
  # NaN stays null, and NC curves skip the epochs where NC was not measured.
  c0 = summary["combos"][names[0]]
  assert c0["stages"]["final"]["clean"]["f1"]["g0"][1] is None
  assert c0["curves"]["train"]["nc1"]["epochs"] == [2, 4, 6, 8, 10, 12]
  assert len(c0["curves"]["train"]["loss"]["epochs"]) == 12


def test_alternative_is_passed_to_the_tests(fake):
  root, _ = fake
  summary = study_results.summarize(root, alternative="less")
  _check_f1_tests(root, summary, alternative="less")


def test_fabricated_report_draws_rate_figure(fake):
  root, report_path = fake
  text = _check_report(report_path, [report.RATE_FILE, report.FIG3_FILE])
  assert "τ = " in text and "left out: fake-unfinished" in text
  with open(os.path.join(root, "report", "table_by_rate.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 4 * 3 * 2 * len(GROUPS)
