"""Figures of one training workdir for the colabs (data: `ncjax.inspection`).

  member_curves      a metric per epoch, one line per member (metrics.jsonl)
  group_f1           test F1 per group, clean vs biased, at each stage
  geometry           features of train and test in the class-mean plane
  flipped_mechanism  the paper's Fig. 1 across the saved stages: where the
                     flipped samples lie between the two class means
  group_confusions   the confusion matrix of each group at each stage

Like `ncjax.report`, figures are `matplotlib.figure.Figure` objects on an
Agg canvas (no pyplot state); `save` writes one as a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ncjax import fairness, inspection
from ncjax import feature_geometry as geo
from ncjax.report import BIASED_STYLE, CLEAN_STYLE, DPI, GROUP_COLORS

STAGE_STYLES = {"early": "--", "final": "-"}
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
# (class, group) -> colour: blues for the negatives, reds for the positives,
# light for group 0, dark for group 1.
CELL_COLORS = {(0, 0): "#9ecae1", (0, 1): "#08519c", (1, 0): "#fc9272", (1, 1): "#a50f15"}
FLIPPED_COLOR = "black"


def save(fig: Figure, path: str) -> str:
  """Writes `fig` as a PNG at `path` (folders made as needed); the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI)
  return path


def _figure(nrows: int, ncols: int, *, width: float, height: float, title: str):
  fig = Figure(figsize=(width * ncols, height * nrows + 0.7), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  fig.suptitle(title)
  return fig, axes


def rate_color(rate: float, rates: Sequence[float]) -> str:
  """Clean blue, the largest rate orange (as the report), others from a palette."""
  biased = sorted(r for r in rates if r > 0)
  if rate == 0:
    return CLEAN_STYLE["color"]
  if rate == biased[-1]:
    return BIASED_STYLE["color"]
  return GROUP_COLORS[biased.index(rate) % len(GROUP_COLORS)]


def _rate_label(rate: float) -> str:
  return "clean (rate 0)" if rate == 0 else f"biased (rate {rate:g})"


def _log_axis(ax, values: np.ndarray) -> None:
  """Log y when every value is positive and they span more than 10x."""
  v = values[np.isfinite(values)]
  if v.size and v.min() > 0 and v.max() / v.min() > 10:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def member_curves(
    df: pd.DataFrame,
    keys: Sequence[str],
    *,
    split: str = "train",
    early: Mapping[str, Mapping[str, int]] | None = None,
    title: str = "",
    ncols: int = 2,
) -> Figure:
  """`keys` of `split` per epoch, one line per member.

  Colour is the bias rate, line style the seed; with `early`
  (`inspection.stage_epochs`) a dot marks each member's early-stop epoch.
  Epochs where a key was not measured are skipped. Log y where the values
  are positive and span more than a decade.
  """
  rows = df[df["split"] == split]
  rates = sorted(rows["bias_rate"].unique())
  seeds = sorted(rows["seed"].unique())
  ncols = min(ncols, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = _figure(
      nrows, ncols, width=5.0, height=3.4,
      title=title or f"{split} metrics per epoch (one line per member)",
  )  # fmt: skip
  flat = axes.ravel()
  for ax in flat[len(keys) :]:
    ax.set_visible(False)
  for ax, key in zip(flat, keys, strict=False):
    ax.set_title(key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} {key}")
    if key not in rows:
      ax.text(0.5, 0.5, "not logged", ha="center", transform=ax.transAxes)
      continue
    for (member, rate, seed), m in rows.groupby(["member", "bias_rate", "seed"]):
      m = m[np.isfinite(m[key])]
      if m.empty:
        continue
      style = LINESTYLES[seeds.index(seed) % len(LINESTYLES)]
      color = rate_color(rate, rates)
      ax.plot(m["epoch"], m[key], color=color, linestyle=style, linewidth=1.4)
      stop = (early or {}).get(member, {}).get("early")
      hit = m[m["epoch"] == stop]
      if not hit.empty:
        ax.plot(hit["epoch"], hit[key], "o", color=color, markersize=6, markeredgecolor="k")
    _log_axis(ax, rows[key].to_numpy(np.float64))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  handles = [Line2D([], [], color=rate_color(r, rates), label=_rate_label(r)) for r in rates]
  handles += [
      Line2D([], [], color="0.3", linestyle=LINESTYLES[i % len(LINESTYLES)], label=f"seed {s}")
      for i, s in enumerate(seeds)
  ]
  if early:
    handles.append(Line2D([], [], marker="o", color="0.3", markeredgecolor="k",
                          linestyle="", label="early-stop epoch"))  # fmt: skip
  fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
  return fig


def group_f1(evals: pd.DataFrame, *, stages: Sequence[str] = ("early", "final")) -> Figure:
  """Test F1 per group (and overall), per bias rate, mean ± sd over seeds.

  `evals` is `inspection.load_stage_eval(workdir)`; dots are single seeds.
  """
  groups = sorted(
      (c.split("/")[1] for c in evals.columns if c.startswith("f1/g")), key=lambda g: int(g[1:])
  )
  cols = [f"f1/{g}" for g in groups] + ["f1"]
  names = [f"group {g[1:]}" for g in groups] + ["all"]
  rates = sorted(evals["bias_rate"].unique())
  fig, axes = _figure(1, len(stages), width=4.6, height=3.6,
                      title="Test F1 (clean labels) per group, mean ± sd over seeds")  # fmt: skip
  width = 0.8 / len(rates)
  x = np.arange(len(cols))
  for ax, stage in zip(axes[0], stages, strict=True):
    for j, rate in enumerate(rates):
      rows = evals[(evals["stage"] == stage) & (evals["bias_rate"] == rate)]
      pos = x + (j - (len(rates) - 1) / 2) * width
      vals = rows[cols].to_numpy(np.float64)
      mean = np.nanmean(vals, axis=0) if len(rows) else np.full(len(cols), np.nan)
      sd = np.nanstd(vals, axis=0, ddof=1) if len(rows) > 1 else np.zeros(len(cols))
      color = rate_color(rate, rates)
      ax.bar(pos, np.nan_to_num(mean), width, yerr=np.nan_to_num(sd), capsize=3,
             color=color, alpha=0.75, label=_rate_label(rate))  # fmt: skip
      for k in range(len(cols)):
        ax.plot(np.full(len(rows), pos[k]), vals[:, k], "o", color="k", markersize=3)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test F1")
    ax.set_title(f"{stage} stage")
    ax.grid(axis="y", alpha=0.3)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  handles.append(Line2D([], [], marker="o", color="k", linestyle="", markersize=3))
  labels.append("one seed")
  fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
  return fig


# ----------------------------------------------------------- feature views


def _stage_title(view: inspection.StageFeatures) -> str:
  return f"{view.stage} stage (epoch {view.epoch})"


def _arrows(ax, view: inspection.StageFeatures, plane: geo.Plane) -> None:
  """The classifier rows w_c projected on the plane, from mu_G, scaled to fit."""
  w2 = view.w @ plane.basis
  (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
  # The largest scale that keeps every tip inside the axes (mu_G is inside).
  room = [
      (hi if v > 0 else lo) / v
      for row in w2 for v, lo, hi in zip(row, (x0, y0), (x1, y1), strict=True) if abs(v) > 1e-12
  ]  # fmt: skip
  scale = 0.8 * min(room) if room else 1.0
  for c, (dx, dy) in enumerate(w2 * scale):
    color = CELL_COLORS[(c, 1)]
    ax.annotate("", xy=(dx, dy), xytext=(0, 0),
                arrowprops=dict(arrowstyle="-|>", color=color, lw=2), zorder=6)  # fmt: skip
    ax.annotate(f"$w_{c}$", xy=(dx, dy), xytext=(4, 4), textcoords="offset points",
                color=color, fontsize=12, fontweight="bold", zorder=6)  # fmt: skip


def _boundary(ax, view: inspection.StageFeatures, plane: geo.Plane) -> None:
  a, c = geo.decision_line(view.w, view.b, plane)
  x0, x1 = ax.get_xlim()
  y0, y1 = ax.get_ylim()
  if abs(a[1]) > abs(a[0]):
    xs = np.array([x0, x1])
    ys = -(a[0] * xs + c) / a[1]
  else:
    ys = np.array([y0, y1])
    xs = -(a[1] * ys + c) / a[0]
  ax.plot(xs, ys, color="0.25", linestyle="--", linewidth=1.2)
  ax.set_xlim(x0, x1)
  ax.set_ylim(y0, y1)


def _view_limits(points_Nx2: np.ndarray, keep_Mx2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Axis limits showing the central 99% of the points and all of `keep`.

  A few outliers would otherwise squeeze the bulk of the samples into a
  corner; they are left outside the view.
  """
  p = points_Nx2[np.all(np.isfinite(points_Nx2), axis=1)]
  lo = np.minimum(np.quantile(p, 0.005, axis=0), keep_Mx2.min(axis=0))
  hi = np.maximum(np.quantile(p, 0.995, axis=0), keep_Mx2.max(axis=0))
  pad = 0.06 * (hi - lo) + 1e-9
  return lo - pad, hi + pad


def geometry(
    views: Sequence[inspection.StageFeatures],
    *,
    split_names: Sequence[str] = ("train", "test"),
    second_axis: str = "within",
) -> Figure:
  """Features of each stage (rows) and split (columns) in the class-mean plane.

  Each stage gets its own plane (`feature_geometry.class_plane` of its train
  features with the trained labels). Colours are (clean class, group);
  black crosses are flipped samples; stars the train class means of the
  trained labels; arrows the classifier rows; dashed the decision boundary
  within the plane.
  """
  member = views[0].member
  fig, axes = _figure(
      len(views), len(split_names), width=4.8, height=4.2,
      title=f"Features of {member} in the class-mean plane",
  )  # fmt: skip
  for row, view in zip(axes, views, strict=True):
    tr = view.splits["train"]
    plane = geo.class_plane(view.means, tr.feats, tr.trained, tr.groups,
                                   second_axis=second_axis)  # fmt: skip
    coords = {s: geo.project(view.splits[s].feats, plane) for s in split_names}
    m2 = geo.project(view.means, plane)
    # Means, mu_G and every flipped sample stay in view; outliers may not.
    keep = [m2, np.zeros((1, 2))] + [coords[s][view.splits[s].flipped] for s in split_names]
    lo, hi = _view_limits(np.concatenate(list(coords.values())), np.concatenate(keep))
    for ax, split in zip(row, split_names, strict=True):
      sf, p = view.splits[split], coords[split]
      for (c, g), color in CELL_COLORS.items():
        sel = (sf.labels == c) & (sf.groups == g) & ~sf.flipped
        ax.scatter(p[sel, 0], p[sel, 1], s=9, color=color, alpha=0.7, linewidths=0)
      if sf.flipped.any():
        ax.scatter(p[sf.flipped, 0], p[sf.flipped, 1], s=40, marker="X", color=FLIPPED_COLOR,
                   edgecolors="white", linewidths=0.5, zorder=4)  # fmt: skip
      for c in range(m2.shape[0]):
        ax.scatter(*m2[c], s=260, marker="*", color=CELL_COLORS[(c, 1)], edgecolors="k",
                   linewidths=1.0, zorder=5)  # fmt: skip
      ax.set_xlim(lo[0], hi[0])
      ax.set_ylim(lo[1], hi[1])
      _arrows(ax, view, plane)
      _boundary(ax, view, plane)
      ax.set_title(f"{split}, {_stage_title(view)}")
      ax.set_xlabel(plane.labels[0])
      ax.set_ylabel(plane.labels[1])
      ax.grid(alpha=0.25)
  handles = [
      Line2D([], [], marker="o", color=color, linestyle="", label=f"class {c}, group {g}")
      for (c, g), color in CELL_COLORS.items()
  ]
  handles += [
      Line2D([], [], marker="X", color=FLIPPED_COLOR, linestyle="", markersize=8,
             label="flipped (trained as 1 - class)"),
      Line2D([], [], marker="*", color="0.5", markeredgecolor="k", linestyle="", markersize=14,
             label="train class means (trained labels)"),
      Line2D([], [], color="0.25", linestyle="--", label="decision boundary (in plane)"),
  ]  # fmt: skip
  fig.legend(handles=handles, loc="outside lower center", ncols=4)
  return fig


def _strip(ax, t: np.ndarray, y: float, color: str, rng, **kwargs) -> None:
  """Points at x = t, jittered vertically around row y."""
  ax.scatter(t, y + rng.uniform(-0.28, 0.28, t.size), color=color, **{"s": 12, **kwargs})


def flipped_mechanism(
    df: pd.DataFrame, views: Sequence[inspection.StageFeatures], *, split: str = "train"
) -> Figure:
  """Fig. 1 across the saved stages: flipped samples leave their true class.

  Left: `flipped_near_true` per epoch of the member (bold) and of the other
  biased members (thin), with the stages' epochs marked. Then, per stage,
  each train sample's position between the class means (0 at the class-0
  mean, 1 at the class-1 mean; `feature_geometry.class_axis_position`) for the
  kept samples of each class and the flipped ones.
  """
  member = views[0].member
  fig, axes = _figure(1, 1 + len(views), width=4.4, height=3.8,
                      title=f"Flipped samples of {member} (paper Fig. 1)")  # fmt: skip
  ax = axes[0, 0]
  key = "flipped_near_true"
  rows = df[(df["split"] == "train") & (df["bias_rate"] > 0)]
  if key in rows:
    for name, m in rows.groupby("member"):
      m = m[np.isfinite(m[key])]
      mine = name == member
      ax.plot(m["epoch"], m[key], color=BIASED_STYLE["color"] if mine else "0.6",
              linewidth=2.2 if mine else 0.9, marker="o" if mine else None, markersize=3,
              label=member if mine else None)  # fmt: skip
    ax.plot([], [], color="0.6", linewidth=0.9, label="other biased members")
  for view in views:
    ax.axvline(view.epoch, color="0.3", linestyle=STAGE_STYLES.get(view.stage, ":"),
               linewidth=1.0, label=f"{view.stage} stage (epoch {view.epoch})")  # fmt: skip
  ax.axhline(0.5, color="0.3", linewidth=0.6)
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel("epoch")
  ax.set_ylabel("flipped samples nearer true-class mean")
  ax.set_title("per epoch (metrics.jsonl)")
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  rng = np.random.default_rng(0)
  rows_ = ((2, "class 0, kept", (0, 1)), (1, "class 1, kept", (1, 1)))
  for ax, view in zip(axes[0, 1:], views, strict=True):
    sf = view.splits[split]
    t = geo.class_axis_position(sf.feats, view.means)
    for y, _, (c, g) in rows_:
      _strip(ax, t[(sf.labels == c) & ~sf.flipped], y, CELL_COLORS[(c, g)], rng, alpha=0.4)
    _strip(ax, t[sf.flipped], 0, FLIPPED_COLOR, rng, marker="X", s=36)
    for x, lab, ha in ((0.0, "$\\mu_0$ ", "right"), (1.0, " $\\mu_1$", "left")):
      ax.axvline(x, color="0.3", linewidth=1.0)
      ax.annotate(lab, (x, 2.42), ha=ha, fontsize=11)
    ax.axvline(0.5, color="0.3", linestyle=":", linewidth=1.0)
    lo, hi = _view_limits(t[:, None], np.concatenate([[0.0, 1.0], t[sf.flipped]])[:, None])
    ax.set_xlim(lo[0], hi[0])
    near = int(np.sum(geo.nearer_true_class(t[sf.flipped], sf.labels[sf.flipped])))
    ax.set_title(f"{_stage_title(view)}\n{near} of {int(sf.flipped.sum())} flipped nearer "
                 "true-class mean", fontsize=10)  # fmt: skip
    ax.set_yticks([0, 1, 2], ["flipped label"] + [name for _, name, _ in rows_][::-1])
    ax.set_ylim(-0.6, 2.7)
    ax.set_xlabel("position between class means (0 = $\\mu_0$, 1 = $\\mu_1$)")
    ax.grid(axis="x", alpha=0.3)
  return fig


def group_confusions(views: Sequence[inspection.StageFeatures], *, split: str = "test") -> Figure:
  """Confusion matrix of each group (columns) at each stage (rows).

  Counts of clean label (rows) against decision (columns); the colour and
  the percentage are per true label (row-normalised: TPR, FNR, ...).
  """
  per_view = [
      inspection.group_confusion(
          v.splits[split].labels, v.splits[split].predictions, v.splits[split].groups
      )
      for v in views
  ]
  groups = sorted({g for c in per_view for g in c})
  fig, axes = _figure(len(views), len(groups), width=3.4, height=3.2,
                      title=f"{views[0].member}: {split} confusion per group")  # fmt: skip
  image = None
  for row, view, conf in zip(axes, views, per_view, strict=True):
    sf = view.splits[split]
    for ax, g in zip(row, groups, strict=True):
      m = conf.get(g, np.zeros((2, 2), int))
      rates = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
      image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
      for i in range(2):
        for j in range(2):
          ax.text(j, i, f"{m[i, j]}\n{100 * rates[i, j]:.0f}%", ha="center", va="center",
                  color="white" if rates[i, j] > 0.6 else "black", fontsize=10)  # fmt: skip
      sel = sf.groups == g
      pred, score = fairness.predictions_from_logits(sf.logits[sel])
      f1 = fairness.classification_metrics(sf.labels[sel], pred, score)["f1"]
      ax.set_title(f"group {g}, {view.stage} (epoch {view.epoch})\nF1 = {f1:.2f}", fontsize=10)
      ax.set_xticks([0, 1], ["0", "1"])
      ax.set_yticks([0, 1], ["0", "1"])
      ax.set_xlabel("predicted")
      ax.set_ylabel("true (clean) label")
  if image is not None:
    fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true label")
  return fig
