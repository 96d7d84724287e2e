"""The study report: the paper's figures, CSV tables and report.md (SPEC 7).

  python -m ncjax.report STUDY   # -> STUDY/summary.json, STUDY/report/

`write_report` summarizes the study (`ncjax.study_results`), then draws from
that summary only, so every number in the text is computed, never typed:
Fig. 2 (train NC1 per epoch) and its appendix siblings (NC2 on W, NC3, NC4,
validation and test NC1), Fig. 1's analogue (flipped samples near their true
class), Fig. 3 (SPLIT vs separability AUC), Fig. 4 (test NC1 and F1 deltas),
and, with more than one nonzero bias rate, delta F1 against the rate.
Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no
pyplot state), so reports can be written from threads and notebooks alike.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ncjax import statistics
from ncjax import study_results as sr

REPORT_DIR = "report"
REPORT_FILE = "report.md"
DPI = 120
CLEAN_STYLE = dict(color="tab:blue", linestyle="--", label="clean")
BIASED_STYLE = dict(color="tab:orange", linestyle="-", label="biased")
GROUP_COLORS = ("tab:purple", "tab:green", "tab:brown", "tab:pink")
# (split, key, file, y label, log y): Fig. 2 first, then the appendix.
CURVE_FIGURES = (
    ("train", "nc1", "fig2_train_nc1.png", "train NC1", True),
    (
        "train",
        "nc2_equinorm_w",
        "figA_train_nc2_equinorm_w.png",
        "train NC2: equinorm of W (std/mean)",
        True,
    ),
    ("train", "nc2_etf_w", "figA_train_nc2_etf_w.png", "train NC2: ETF-gram distance of W", True),
    ("train", "nc3", "figA_train_nc3.png", "train NC3 (self-duality)", True),
    ("train", "nc4", "figA_train_nc4.png", "train NC4 (fraction disagreeing)", False),
    ("validation", "nc1", "figA_validation_nc1.png", "validation NC1", True),
    ("test", "nc1", "figA_test_nc1.png", "test NC1", True),
)
FIG1_FILE = "fig1_flipped_near_true.png"
FIG3_FILE = "fig3_split_vs_separability.png"
FIG4_FILE = "fig4_delta_nc1_f1.png"
RATE_FILE = "fig_delta_f1_vs_rate.png"


# ------------------------------------------------------------------ format


def _nan(x: Any) -> float:
  return math.nan if x is None else float(x)


def _num(x: Any, digits: int = 3) -> str:
  x = _nan(x)
  return "n/a" if math.isnan(x) else f"{x + 0.0:.{digits}g}"  # + 0.0: no '-0'


def _pm(values: Sequence[Any], digits: int = 3) -> str:
  mean, sd, _ = sr.mean_sd(values)
  return f"{_num(mean, digits)} ± {_num(sd, digits)}"


def _p(p: Any) -> str:
  p = _nan(p)
  return "n/a" if math.isnan(p) else ("< 0.001" if p < 1e-3 else f"{p:.3f}")


def _yes(flag: bool) -> str:
  return "yes" if flag else "no"


# ----------------------------------------------------------------- figures


def _grid(n: int, title: str, *, width: float = 4.3, height: float = 3.3):
  ncols = min(3, n)
  nrows = math.ceil(n / ncols)
  # At least 9 inches wide so that the title and the legend fit one panel.
  fig = Figure(figsize=(max(9.0, width * ncols), height * nrows + 0.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  fig.suptitle(title)
  return fig, axes[:n]


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=DPI)
  return path


def _band(ax, epochs, stats, style, *, floor: float | None = None):
  mean = np.asarray([_nan(v) for v in stats["mean"]])
  sd = np.nan_to_num(np.asarray([_nan(v) for v in stats["sd"]]))
  marker = "o" if len(epochs) <= 30 else None
  ax.plot(epochs, mean, marker=marker, markersize=3, **style)
  lo = mean - sd if floor is None else np.maximum(mean - sd, floor)
  ax.fill_between(epochs, lo, mean + sd, color=style["color"], alpha=0.2, linewidth=0)


def _epoch_axis(ax, log: bool = False) -> None:
  ax.set_xlabel("epoch")
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  if log:
    # Plain numbers at 1-2-5 steps instead of matplotlib's 4x10^1 minor labels.
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if hi / lo > 20 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.grid(alpha=0.3)


def _early_line(ax, epoch: Any, label: str = "mean early stop"):
  if not math.isnan(_nan(epoch)):
    ax.axvline(_nan(epoch), color="0.4", linestyle=":", linewidth=1.2, label=label)


def _legend(fig: Figure, axes) -> None:
  handles, labels = {}, []
  for ax in axes:
    for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
      if lab not in handles:
        handles[lab] = h
        labels.append(lab)
  if labels:
    fig.legend(
        [handles[lab] for lab in labels], labels, loc="outside lower center", ncols=len(labels)
    )


def curve_figure(summary, split: str, key: str, ylabel: str, log: bool, path: str) -> str | None:
  """Fig. 2 style: `key` per epoch, biased solid vs clean dashed, mean +- sd."""
  combos = summary["combos"]
  if not any(key in c["curves"].get(split, {}) for c in combos.values()):
    return None
  n_seeds = max(len(c["seeds"]) for c in combos.values())
  fig, axes = _grid(len(combos), f"{ylabel} per epoch (mean ± sd over {n_seeds} seeds)")
  for ax, (name, c) in zip(axes, combos.items(), strict=True):
    curve = c["curves"].get(split, {}).get(key)
    ax.set_title(name)
    ax.set_ylabel(ylabel)
    if not curve:
      ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
      continue
    means = np.asarray([_nan(v) for g in ("clean", "biased") for v in curve[g]["mean"]])
    means = means[np.isfinite(means)]
    use_log = log and means.size > 0 and means.min() > 0
    # NC metrics are >= 0, and a log axis cannot show mean - sd <= 0 at all.
    floor = 0.2 * means.min() if use_log else 0.0
    _band(ax, curve["epochs"], curve["clean"], CLEAN_STYLE, floor=floor)
    biased = dict(BIASED_STYLE, label=f"biased (rate {c['main_rate']:g})")
    _band(ax, curve["epochs"], curve["biased"], biased, floor=floor)
    _early_line(ax, c["early_stop"]["mean"])
    _epoch_axis(ax, use_log)
  _legend(fig, axes)
  return _save(fig, path)


def fig1_flipped(summary, path: str) -> str | None:
  """Fig. 1 analogue: fraction of flipped train samples nearer the true class."""
  combos = summary["combos"]
  if not any("flipped_near_true" in c["curves"].get("train", {}) for c in combos.values()):
    return None
  fig, axes = _grid(
      len(combos),
      "Flipped train samples nearer their true-class mean (biased models, mean ± sd over seeds)",
  )
  for ax, (name, c) in zip(axes, combos.items(), strict=True):
    curve = c["curves"]["train"].get("flipped_near_true")
    ax.set_title(name)
    ax.set_ylabel("fraction of flipped samples")
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="0.3", linewidth=0.8, label="0.5")
    if curve:
      per_rate = curve.get("by_rate") or {sr.rate_name(c["main_rate"]): curve["biased"]}
      biased_rates = [rs for rs in per_rate if float(rs) > 0]  # clean has no flips
      for i, rs in enumerate(biased_rates):
        color = BIASED_STYLE["color"] if len(biased_rates) == 1 else GROUP_COLORS[i % 4]
        style = dict(color=color, linestyle="-", label=f"bias rate {rs}")
        _band(ax, curve["epochs"], per_rate[rs], style)
    _early_line(ax, c["early_stop"]["mean_biased"], "mean early stop (biased)")
    _epoch_axis(ax)
  _legend(fig, axes)
  return _save(fig, path)


def _tau_short(t: dict[str, Any]) -> str:
  if t["tau"] is None:
    return f"τ n/a (n = {t['n']})"
  return f"τ = {_num(t['tau'], 2)}, p = {_p(t['p'])}"


def fig3_split(summary, path: str, stages: Sequence[str] = sr.STAGES) -> str:
  """Fig. 3: SPLIT AUC against separability AUC, one point per combination;
  one panel per stage in `stages`."""
  combos = summary["combos"]
  fig = Figure(figsize=(1.5 + 4.75 * len(stages), 5.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(stages), squeeze=False)[0]
  # One panel is too narrow for the title on one line.
  fig.suptitle(
      "SPLIT AUC of the disease models' features vs subgroup separability"
      + (" " if len(stages) > 1 else "\n")
      + "(mean ± sd over seeds)"
  )
  vals = []  # every mean +- sd, so that no error bar runs off the axes
  for c in combos.values():
    per_seed = [c["separability_auc"]]
    per_seed += [c["stages"][s][g]["split_auc"] for s in sr.STAGES for g in ("clean", "biased")]
    for values in per_seed:
      mean, sd, _ = sr.mean_sd(values)
      vals += [mean - np.nan_to_num(sd), mean + np.nan_to_num(sd)]
  finite = [v for v in vals if not math.isnan(v)] or [0.5, 1.0]
  lo, hi = max(0.0, min(finite) - 0.05), min(1.02, max(finite) + 0.05)
  for ax, stage, letter in zip(axes, stages, "abcd", strict=False):
    ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=1, label="y = x")
    for i, (name, c) in enumerate(combos.items()):
      x, xs, _ = sr.mean_sd(c["separability_auc"])
      color = f"C{i % 10}"
      for side, face in (("biased", color), ("clean", "none")):
        y, ys, _ = sr.mean_sd(c["stages"][stage][side]["split_auc"])
        ax.errorbar(
            x,
            y,
            xerr=np.nan_to_num(xs),
            yerr=np.nan_to_num(ys),
            fmt="o",
            color=color,
            markerfacecolor=face,
            markersize=7,
            capsize=3,
            label=name if side == "biased" else None,
        )
    if all(math.isnan(sr.mean_sd(c["separability_auc"])[0]) for c in combos.values()):
      ax.text(0.5, 0.5, "no separability runs found", ha="center", transform=ax.transAxes)
    # Kendall's tau goes in the title, where no data point can hide it.
    tau, tau_c = summary["kendall_tau"][stage], summary["kendall_tau_clean"][stage]
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_title(
        f"({letter}) {stage} stage\nbiased: {_tau_short(tau)};  clean: {_tau_short(tau_c)}",
        fontsize=10,
    )
    ax.set_xlabel("subgroup separability AUC (attribute from images)")
    ax.set_ylabel("SPLIT AUC (attribute from features)")
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  handles += [
      Line2D([], [], marker="o", color="0.3", linestyle=""),
      Line2D([], [], marker="o", color="0.3", markerfacecolor="none", linestyle=""),
  ]
  labels += ["filled: biased models", "hollow: clean models"]
  fig.legend(handles, labels, loc="outside right center")
  return _save(fig, path)


def _bars(ax, summary, stage, field, ylabel, *, stars: bool):
  combos = summary["combos"]
  names = list(combos)
  groups = combos[names[0]]["groups"]
  width = 0.8 / len(groups)
  x = np.arange(len(names))
  alpha = summary["alpha"]
  for j, g in enumerate(groups):
    d = [combos[n]["stages"][stage][field][g] for n in names]
    mean = np.asarray([_nan(v["mean"]) for v in d])
    sd = np.nan_to_num(np.asarray([_nan(v["sd"]) for v in d]))
    pos = x + (j - (len(groups) - 1) / 2) * width
    ax.bar(
        pos,
        np.nan_to_num(mean),
        width,
        yerr=sd,
        capsize=3,
        color=GROUP_COLORS[j % 4],
        label=f"group {g[1:]}",
    )
    if stars:
      for k, n in enumerate(names):
        p = _nan(combos[n]["stages"][stage]["mannwhitney_f1"][g]["p"])
        if statistics.significance_marker(p, alpha):
          m = np.nan_to_num(mean[k])
          y = m + sd[k] if m >= 0 else m - sd[k]
          ax.annotate(
              "*",
              (pos[k], y),
              ha="center",
              va="bottom" if m >= 0 else "top",
              fontsize=14,
              xytext=(0, 2 if m >= 0 else -2),
              textcoords="offset points",
          )
  ax.axhline(0, color="0.2", linewidth=0.8)
  crowded = len(names) > 3  # long names would overlap unless slanted
  ax.set_xticks(x, names, rotation=20 if crowded else 0, ha="right" if crowded else "center")
  ax.set_ylabel(ylabel)
  ax.set_title(f"{ylabel.split(' (')[0]}, {stage} stage")
  ax.margins(y=0.15)
  ax.grid(axis="y", alpha=0.3)


def fig4_deltas(summary, path: str, stages: Sequence[str] = sr.STAGES) -> str:
  """Fig. 4: biased - clean test NC1 and F1 per group; * where p < alpha.
  One row per stage in `stages`."""
  n = len(summary["combos"])
  width = min(16.0, max(9.0, 1.2 * n + 4))
  fig = Figure(figsize=(width, 0.9 + 3.3 * len(stages)), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(stages), 2, squeeze=False)
  fig.suptitle(
      f"Biased − clean models on the clean test set (mean ± sd); "
      f"* Mann-Whitney p < {summary['alpha']:g} (uncorrected)"
  )
  for row, stage in enumerate(stages):
    _bars(
        axes[row, 0], summary, stage, "delta_nc1_test", "Δ test NC1 (biased − clean)", stars=False
    )
    _bars(axes[row, 1], summary, stage, "delta_f1", "Δ F1 (biased − clean)", stars=True)
  _legend(fig, [axes[0, 0]])
  return _save(fig, path)


def rate_figure(summary, path: str) -> str | None:
  """Delta F1 against bias rate, per group, early (dashed) and final (solid)."""
  combos = summary["combos"]
  if not any(len(c["by_rate"]) > 1 for c in combos.values()):
    return None
  fig, axes = _grid(
      len(combos),
      "Δ F1 (biased − clean) against bias rate "
      f"(mean ± sd over seeds; * Mann-Whitney p < {summary['alpha']:g})",
  )
  for ax, (name, c) in zip(axes, combos.items(), strict=True):
    rates = sorted(c["by_rate"], key=float)
    # A small x offset per line keeps error bars of one rate apart.
    step = 0.008 * float(rates[-1])
    for j, g in enumerate(c["groups"]):
      for k, (stage, ls) in enumerate((("early", "--"), ("final", "-"))):
        xs = [0.0] + [float(r) + (2 * j + k - 1.5) * step for r in rates]
        d = [c["by_rate"][r][stage]["delta_f1"][g] for r in rates]
        mean = [0.0] + [_nan(v["mean"]) for v in d]
        sd = [0.0] + [np.nan_to_num(_nan(v["sd"])) for v in d]
        ax.errorbar(
            xs,
            mean,
            yerr=sd,
            color=GROUP_COLORS[j % 4],
            linestyle=ls,
            marker="o",
            markersize=4,
            capsize=3,
            label=f"group {g[1:]}, {stage}",
        )
        for r, x, m in zip(rates, xs[1:], mean[1:], strict=True):
          p = _nan(c["by_rate"][r][stage]["mannwhitney_f1"][g]["p"])
          if statistics.significance_marker(p, summary["alpha"]):
            ax.annotate(
                "*",
                (x, m),
                xytext=(4, 2),
                textcoords="offset points",
                color=GROUP_COLORS[j % 4],
                fontsize=13,
            )
    ax.axhline(0, color="0.2", linewidth=0.8)
    ax.set_title(name)
    ax.set_xlabel("bias rate (fraction of eligible labels flipped)")
    ax.set_ylabel("Δ F1 (biased − clean)")
    ax.grid(alpha=0.3)
  _legend(fig, axes)
  return _save(fig, path)


# ------------------------------------------------------------------ tables


def _write_csv(path: str, rows: list[dict[str, Any]]) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
  return path


def fairness_rows(summary) -> list[dict[str, Any]]:
  """Per (combo, stage, group) at the main rate: F1, delta, tests, test NC1."""
  rows = []
  for name, c in summary["combos"].items():
    for stage in sr.STAGES:
      s = c["stages"][stage]
      for g in c["groups"]:
        d, nc, t = s["delta_f1"][g], s["delta_nc1_test"][g], s["mannwhitney_f1"][g]
        rows.append(
            {
                "combo": name,
                "stage": stage,
                "group": g,
                "bias_rate": c["main_rate"],
                "f1_clean_mean": d["clean_mean"],
                "f1_clean_sd": d["clean_sd"],
                "f1_biased_mean": d["biased_mean"],
                "f1_biased_sd": d["biased_sd"],
                "delta_f1": d["mean"],
                "delta_f1_sd": d["sd"],
                "mwu_u": t["u"],
                "p": t["p"],
                "p_holm": t["p_holm"],
                "nc1_test_clean_mean": nc["clean_mean"],
                "nc1_test_biased_mean": nc["biased_mean"],
                "delta_nc1_test": nc["mean"],
                "delta_nc1_test_sd": nc["sd"],
            }
        )
  return rows


def split_rows(summary) -> list[dict[str, Any]]:
  """Per (combo, stage): separability and SPLIT AUC of clean and biased models."""
  rows = []
  for name, c in summary["combos"].items():
    sep = sr.mean_sd(c["separability_auc"])
    for stage in sr.STAGES:
      clean = sr.mean_sd(c["stages"][stage]["clean"]["split_auc"])
      biased = sr.mean_sd(c["stages"][stage]["biased"]["split_auc"])
      rows.append(
          {
              "combo": name,
              "stage": stage,
              "separability_auc_mean": sep[0],
              "separability_auc_sd": sep[1],
              "split_auc_clean_mean": clean[0],
              "split_auc_clean_sd": clean[1],
              "split_auc_biased_mean": biased[0],
              "split_auc_biased_sd": biased[1],
          }
      )
  return rows


def rate_rows(summary) -> list[dict[str, Any]]:
  """Per (combo, rate, stage, group): delta F1 and its tests (Holm over rates)."""
  rows = []
  for name, c in summary["combos"].items():
    for rate, per_stage in sorted(c["by_rate"].items(), key=lambda kv: float(kv[0])):
      for stage in sr.STAGES:
        for g in c["groups"]:
          d, t = per_stage[stage]["delta_f1"][g], per_stage[stage]["mannwhitney_f1"][g]
          rows.append(
              {
                  "combo": name,
                  "bias_rate": float(rate),
                  "stage": stage,
                  "group": g,
                  "delta_f1": d["mean"],
                  "delta_f1_sd": d["sd"],
                  "p": t["p"],
                  "p_holm": t["p_holm"],
              }
          )
  return rows


# -------------------------------------------------------------------- text


def _combo_findings(name: str, c: dict[str, Any], alpha: float) -> list[str]:
  """Sentences stating what this combination's numbers show."""
  f, out = c["findings"], [f"### {name}", ""]
  early_nc1 = f.get("train_nc1_at_early_stop")
  if early_nc1:
    t = early_nc1["mannwhitney"]
    higher = _nan(early_nc1["delta"]["mean"]) > 0
    out.append(
        f"- **Train NC1 early** (epoch {early_nc1['epoch']}, nearest the mean early-stop "
        f"epoch {_num(c['early_stop']['mean'])}): biased {_pm(early_nc1['biased'])} vs clean "
        f"{_pm(early_nc1['clean'])} (Mann-Whitney p = {_p(t['p'])}). Biased models "
        + (
            "have higher train NC1 than clean ones"
            if higher
            else "do not have higher train NC1 than clean ones, unlike the paper"
        )
        + (f" (p < {alpha:g})." if _nan(t["p"]) < alpha else " (not significant).")
    )
  first_last = f.get("train_nc1_first_last")
  if first_last:
    falls = {
        g: _nan(first_last[g]["last"]) < _nan(first_last[g]["first"]) for g in ("clean", "biased")
    }
    verdict = (
        "falls for both"
        if all(falls.values())
        else "does not fall for both ("
        + ", ".join(f"{g}: {'falls' if v else 'does not fall'}" for g, v in falls.items())
        + ")"
    )
    out.append(
        f"- **Train NC1 late** (epoch {first_last['first_epoch']} → {first_last['last_epoch']}): "
        f"clean {_num(first_last['clean']['first'])} → {_num(first_last['clean']['last'])}, "
        f"biased {_num(first_last['biased']['first'])} → {_num(first_last['biased']['last'])}; "
        f"train NC1 {verdict}."
    )
  flipped = f.get("flipped_near_true")
  if flipped:
    e, fin = flipped["early"], flipped["final"]
    if _nan(fin["mean"]) < _nan(e["mean"]):
      verdict = "They drift towards the flipped-class mean" + (
          " and end on its side (< 0.5)."
          if _nan(fin["mean"]) < 0.5
          else ", but most still lie nearer the true class."
      )
    else:
      verdict = "They do not drift towards the flipped-class mean."
    out.append(
        f"- **Flipped samples** (Fig. 1): at the biased early stop (epoch "
        f"{flipped['early_epoch']}) {_num(e['mean'])} ± {_num(e['sd'])} of the flipped train "
        f"samples lie nearer the true-class mean; at epoch {flipped['final_epoch']}, {_num(fin['mean'])} ± "
        f"{_num(fin['sd'])}. {verdict}"
    )
  final, early = c["stages"]["final"], c["stages"]["early"]
  for g in c["groups"]:
    d, t = final["delta_f1"][g], final["mannwhitney_f1"][g]
    lower, sig = _nan(d["mean"]) < 0, _nan(t["p"]) < alpha
    verdict = (
        "lower, significantly"
        if lower and sig
        else "lower, but not significantly"
        if lower
        else "not lower"
    )
    out.append(
        f"- **Group-{g[1:]} F1, final stage**: biased {_num(d['biased_mean'])} ± "
        f"{_num(d['biased_sd'])} vs clean {_num(d['clean_mean'])} ± {_num(d['clean_sd'])} "
        f"(ΔF1 = {_num(d['mean'])}, p = {_p(t['p'])}, Holm p = {_p(t['p_holm'])}): "
        f"the biased models' F1 is {verdict}."
    )
  for g in c["groups"]:
    gap_early = -_nan(early["delta_f1"][g]["mean"])
    gap_final = -_nan(final["delta_f1"][g]["mean"])
    if gap_early < gap_final:
      verdict = "smaller than"
    elif gap_early == gap_final:
      verdict = "equal to (so not smaller than)"
    else:
      verdict = "not smaller than"
    out.append(
        f"- **Group-{g[1:]} F1 gap** (clean − biased): early {_num(gap_early)}, final "
        f"{_num(gap_final)}; the early-stage gap is {verdict} the final-stage gap."
    )
  return out + [""]


def _min_p(summary) -> float:
  """The smallest p-value the F1 test can reach with this many seeds."""
  n = min(len(c["seeds"]) for c in summary["combos"].values())
  return statistics.mann_whitney(
      np.arange(n) + n, np.arange(n), alternative=summary["alternative"]
  ).pvalue


def _tau_line(label: str, t: dict[str, Any]) -> str:
  if t["tau"] is None:
    return f"- {label}: not computed ({t['reason']})."
  return (
      f"- {label}: τ = {_num(t['tau'])}, p = {_p(t['p'])} "
      f"(n = {t['n']} combinations, {t['method']})."
  )


def _md_table(rows: list[dict[str, Any]], cols: Sequence[str]) -> list[str]:
  def cell(v):
    return _num(v) if isinstance(v, float) or v is None else str(v)

  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(cell(r[k]) for k in cols) + " |" for r in rows]
  return lines + [""]


def _markdown(summary, figures: dict[str, str | None], tables: dict[str, str]) -> str:
  combos = summary["combos"]
  first = next(iter(combos.values()))
  rates = sorted({r for c in combos.values() for r in c["rates"]})
  lines = [
      "# Neural collapse and fairness: study report",
      "",
      f"Generated from `{sr.SUMMARY_FILE}` of `{summary['study_dir']}`. "
      f"{len(combos)} combination{'s' if len(combos) > 1 else ''} ({', '.join(combos)}), seeds {first['seeds']}, "
      f"bias rates {rates} ('biased' = rate {first['main_rate']:g}), {first['epochs']} epochs. "
      f"F1 tests: Mann-Whitney U ({summary['alternative']}), biased vs clean, "
      f"'*' at p < {summary['alpha']:g}; Holm-adjusted p over the tests of a figure.",
      "",
  ]
  min_p = _min_p(summary)
  if min_p >= summary["alpha"]:
    lines += [
        f"**Caution:** with {len(first['seeds'])} seeds per side the smallest p-value the "
        f"Mann-Whitney test can reach is {_p(min_p)}, so no difference can be significant "
        f"at {summary['alpha']:g}; run more seeds.",
        "",
    ]
  if summary.get("skipped"):
    lines += [f"Not evaluated yet, left out: {', '.join(summary['skipped'])}.", ""]
  missing = [n for n, c in combos.items() if not c["separability_auc"]]
  if missing:
    lines += [
        f"No separability run for {', '.join(missing)}: left out of Fig. 3 and Kendall's τ.",
        "",
    ]
  lines += ["## Findings", ""]
  for name, c in combos.items():
    lines += _combo_findings(name, c, summary["alpha"])
  lines += [
      "**Kendall's τ** between mean separability AUC and mean SPLIT AUC across combinations:",
      "",
  ]
  for stage in sr.STAGES:
    lines.append(_tau_line(f"{stage} stage, biased models", summary["kendall_tau"][stage]))
    lines.append(_tau_line(f"{stage} stage, clean models", summary["kendall_tau_clean"][stage]))
  lines.append("")

  def fig(key, title, caption):
    path = figures.get(key)
    if path:
      lines.extend([f"## {title}", "", f"![{title}]({os.path.basename(path)})", "", caption, ""])

  fig(
      "fig2",
      "Fig. 2: train NC1 per epoch",
      "Biased (solid orange) vs clean (dashed blue), mean ± sd over seeds; log y axis; "
      "dotted: mean early-stop epoch.",
  )
  fig(
      "fig1",
      "Fig. 1 analogue: flipped samples per epoch",
      "Fraction of the flipped (mislabelled) train samples whose feature is nearer their true "
      "class mean than their (flipped) training label's; below 0.5 most sit with the flipped "
      "class.",
  )
  fig(
      "fig3",
      "Fig. 3: SPLIT vs subgroup separability",
      "Attribute information in the disease models' features (SPLIT) against that in the "
      "images (separability); points on y = x keep all of it. Error bars: sd over seeds.",
  )
  fig(
      "fig4",
      "Fig. 4: test NC1 and F1 deltas",
      "Biased − clean per group. Positive ΔNC1: worse test collapse; negative ΔF1: the biased "
      "model is worse. Raw and Holm-adjusted p-values below and in `table_fairness.csv`.",
  )
  lines += _md_table(
      fairness_rows(summary),
      (
          "combo",
          "stage",
          "group",
          "f1_clean_mean",
          "f1_biased_mean",
          "delta_f1",
          "p",
          "p_holm",
          "delta_nc1_test",
      ),
  )
  fig(
      "rate",
      "Δ F1 against bias rate",
      "Early (dashed) and final (solid) stage; Holm over "
      "combos x groups x rates per stage in `table_by_rate.csv`.",
  )
  lines += ["## Appendix: NC2-4 and validation/test NC1", ""]
  for split, key, _, label, _ in CURVE_FIGURES[1:]:
    path = figures.get(f"{split}/{key}")
    if path:
      lines += [f"![{label} ({split})]({os.path.basename(path)})", ""]
  names = [os.path.basename(p) for p in tables.values()]
  lines += ["## Tables", ""] + [f"- [{n}]({n})" for n in names]
  return "\n".join(lines) + "\n"


def write_report(study_dir: str, **summarize_kwargs) -> str:
  """Writes STUDY/summary.json and STUDY/report/; returns report.md's path.

  `summarize_kwargs` (alternative, alpha, main_rate) go to
  `study_results.summarize`.
  """
  sr.write_summary(study_dir, **summarize_kwargs)
  summary = sr.load_summary(study_dir)
  out = os.path.join(study_dir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  figures: dict[str, str | None] = {}
  for split, key, file, label, log in CURVE_FIGURES:
    name = "fig2" if (split, key) == ("train", "nc1") else f"{split}/{key}"
    figures[name] = curve_figure(summary, split, key, label, log, os.path.join(out, file))
  figures["fig1"] = fig1_flipped(summary, os.path.join(out, FIG1_FILE))
  figures["fig3"] = fig3_split(summary, os.path.join(out, FIG3_FILE))
  figures["fig4"] = fig4_deltas(summary, os.path.join(out, FIG4_FILE))
  figures["rate"] = rate_figure(summary, os.path.join(out, RATE_FILE))
  tables = {
      "fairness": _write_csv(os.path.join(out, "table_fairness.csv"), fairness_rows(summary)),
      "split": _write_csv(os.path.join(out, "table_split.csv"), split_rows(summary)),
  }
  if figures["rate"]:
    tables["by_rate"] = _write_csv(os.path.join(out, "table_by_rate.csv"), rate_rows(summary))
  path = os.path.join(out, REPORT_FILE)
  with open(path, "w") as f:
    f.write(_markdown(summary, figures, tables))
  return path


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m ncjax.report STUDY_DIR")
  print(write_report(sys.argv[1]))
