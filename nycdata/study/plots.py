"""Every figure of the package; label maps always use the colours of :mod:`nycdata.data.classes`."""

from __future__ import annotations

import matplotlib
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from nycdata.data.classes import CLASS_COLOURS, CLASS_NAMES, colormap, legend_handles
from nycdata.model.tim import ESRI_LULC_CLASSES, ESRI_LULC_COLOURS
from nycdata.study.stats import no_interval_text, present_interval

S2_RGB = (3, 2, 1)  # B04, B03, B02 within a timestep


def class_histogram(pixels: pd.DataFrame):
    """Bar chart of label pixels per split and class."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    pixels[list(CLASS_NAMES)].plot.bar(ax=ax, color=list(CLASS_COLOURS), rot=0)
    ax.set_ylabel("label pixels")
    ax.set_title("class balance per split")
    return fig


def footprints(index):
    """Chip footprints coloured by split (lon/lat, no web tiles)."""
    fig, ax = plt.subplots(figsize=(6, 6))
    for split, colour in zip(("train", "val", "test"), ("#4c72b0", "#dd8452", "#c44e52")):
        part = index[index["split"] == split]
        if len(part):
            part.plot(ax=ax, color=colour, edgecolor="black", linewidth=0.3, label=split)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title("chip footprints by split")
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=s) for s, c in
                       zip(("train", "val", "test"), ("#4c72b0", "#dd8452", "#c44e52"))])
    return fig


def label_image(ax, label, title: str = "label") -> None:
    cmap, norm = colormap()
    ax.imshow(np.asarray(label), cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")


def rgb(s2_reflectance: np.ndarray) -> np.ndarray:
    """(12, H, W) reflectance x 10000 -> (H, W, 3) in 0..1 with a 2-98 % stretch."""
    image = np.stack([s2_reflectance[b] for b in S2_RGB], axis=-1).astype(float)
    lo, hi = np.percentile(image, (2, 98))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def sample_panel(arrays: dict, timesteps: int, title: str):
    """S2 RGB per timestep, S1 VV/VH (first timestep), DEM and label of one chip (raw arrays from disk)."""
    n = timesteps + 4
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.8))
    s2 = arrays["S2L2A"].reshape(timesteps, 12, *arrays["S2L2A"].shape[-2:])
    for t in range(timesteps):
        axes[t].imshow(rgb(s2[t]))
        axes[t].set_title(f"S2 RGB t{t}")
    for i, pol in enumerate(("VV", "VH")):
        axes[timesteps + i].imshow(arrays["S1RTC"][i], cmap="gray")
        axes[timesteps + i].set_title(f"S1 {pol} dB")
    axes[timesteps + 2].imshow(arrays["DEM"][0], cmap="terrain")
    axes[timesteps + 2].set_title("DEM m")
    label_image(axes[-1], arrays["LULC"][0])
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.legend(handles=legend_handles(), loc="lower center", ncol=5, fontsize=8)
    return fig


def training_curves(epochs: pd.DataFrame):
    """Loss and mIoU per epoch from the folded ``metrics.csv``."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for column in ("train/loss", "val/loss"):
        if column in epochs:
            left.plot(epochs["epoch"] + 1, epochs[column], marker="o", label=column)
    for column in ("train/mIoU", "val/mIoU"):
        if column in epochs:
            right.plot(epochs["epoch"] + 1, epochs[column], marker="o", label=column)
    left.set_xlabel("epoch")
    right.set_xlabel("epoch")
    left.legend()
    right.legend()
    return fig


def confusion(cm: np.ndarray, title: str):
    """Raw counts and row-normalised confusion matrix side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    for ax, data, name in ((axes[0], cm, "pixels"), (axes[1], normalised, "row-normalised")):
        ax.imshow(data, cmap="Blues")
        for (i, j), value in np.ndenumerate(data):
            ax.text(j, i, f"{value:.2f}" if data is normalised else f"{int(value)}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45)
        ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {name}")
    fig.tight_layout()
    return fig


def thought_panel(rgb_image, truth, esri_map, thought_classes, tokens, predictions: dict, title: str):
    """S2 RGB, ground truth, decoded thought (ESRI legend), thought in our classes, token grid, predictions."""
    from matplotlib.colors import ListedColormap

    n = 5 + len(predictions)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0))
    axes[0].imshow(rgb_image)
    axes[0].set_title("S2 RGB")
    label_image(axes[1], truth, "ground truth")
    axes[2].imshow(esri_map, cmap=ListedColormap(ESRI_LULC_COLOURS), vmin=-0.5, vmax=9.5, interpolation="nearest")
    axes[2].set_title("thought (ESRI LULC)")
    label_image(axes[3], thought_classes, "thought -> 5 classes")
    axes[4].imshow(tokens, cmap="tab20", interpolation="nearest")
    axes[4].set_title(f"token ids {tokens.shape[0]}x{tokens.shape[1]}")
    for ax, (name, pred) in zip(axes[5:], predictions.items()):
        label_image(ax, pred, name)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    esri = [matplotlib.patches.Patch(color=c, label=n) for n, c in zip(ESRI_LULC_CLASSES, ESRI_LULC_COLOURS)]
    fig.legend(handles=legend_handles() + esri, loc="lower center", ncol=8, fontsize=7)
    return fig


def _forest_row(ax, y: float, centre: float, interval, n_parents: int, marker: str, colour: str, label) -> None:
    """One point with its interval bar, or the point alone marked as the tables mark a missing interval."""
    present = present_interval(interval)
    ax.plot(centre, y, marker=marker, color=colour, linestyle="none", label=label)
    if present is None:
        ax.annotate(no_interval_text(n_parents), (centre, y), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8)
    else:  # a bar from lo to hi, not errorbar: a percentile interval need not contain its point estimate
        ax.plot(present, [y, y], color=colour, marker="|", markersize=10)


def forest(comparison: dict):
    """Per comparison: pooled delta with its bootstrap CI and mean per-parent delta with its t-interval (pp)."""
    names = list(comparison)
    # Wider for long comparison names, which constrained layout would otherwise take from the axes until the bars
    # are a sliver; it keeps title, labels and the legend below the axes inside the figure.
    width = max(7.5, 5.0 + 0.085 * max(map(len, names), default=0))
    fig, ax = plt.subplots(figsize=(width, 0.8 * len(names) + 2.2), layout="constrained")
    rows = (("delta_miou_pp", "ci95_pp", 0.15, "o", "#1f77b4", "pooled Δ, bootstrap CI (parents, seeds)"),
            ("parent_mean_delta_pp", "parent_t_ci95_pp", -0.15, "s", "#d62728", "mean per-parent Δ, t-interval"))
    labelled = set()
    for i, name in enumerate(names):
        c = comparison[name]
        for centre, interval, dy, marker, colour, label in rows:
            if c.get(centre) is not None:   # results of older runs have no per-parent row
                _forest_row(ax, i + dy, c[centre], c.get(interval), c["n_parents"], marker, colour,
                            None if label in labelled else label)
                labelled.add(label)
    for x, style in ((0, "-"), (1, ":"), (2, "--")):
        ax.axvline(x, color="grey", linestyle=style, linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("Δ mIoU (pp), TiM − baseline; lines: 0, publish (+1), strong (+2)")
    ax.set_title("TiM effect with 95 % intervals over test parents\n(no interval: fewer than 2 test parents)", fontsize=9)
    fig.legend(fontsize=8, loc="outside lower center", ncol=2, frameon=False)  # below the axes: never over a bar
    return fig


def per_class_delta(comparison: dict):
    """Per-class IoU delta (pp) of each comparison, bars in class colours."""
    frame = pd.DataFrame({name: c["per_class_delta_iou_pp"] for name, c in comparison.items()}).reindex(list(CLASS_NAMES))
    fig, ax = plt.subplots(figsize=(8, 3.5 + 0.2 * len(frame.columns)), layout="constrained")
    width = 0.8 / max(len(frame.columns), 1)
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||"]
    for j, name in enumerate(frame.columns):
        ax.bar(np.arange(len(frame)) + j * width, frame[name], width, color=list(CLASS_COLOURS), edgecolor="black",
               hatch=hatches[j % len(hatches)])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(frame)) + width * (len(frame.columns) - 1) / 2, frame.index)
    ax.set_ylabel("Δ IoU (pp)")
    # the bars take their class's colour, so a comparison is told by its hatch alone; below the axes, never over a bar
    handles = [matplotlib.patches.Patch(facecolor="white", edgecolor="black", hatch=hatches[j % len(hatches)], label=name)
               for j, name in enumerate(frame.columns)]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=2, frameon=False)
    return fig


def gain_vs_agreement(points: pd.DataFrame):
    """Per test chip: TiM's mIoU gain over the baseline against how right its thought was."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(points["thought_agreement"], points["gain_pp"], s=18)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("thought agreement with ground truth (pixel fraction)")
    ax.set_ylabel("TiM gain (pp mIoU)")
    ax.set_title("does TiM help where its thought is right?")
    fig.tight_layout()
    return fig


def before_after(before: np.ndarray, after: np.ndarray, titles: tuple[str, str], suptitle: str):
    """Two images and their value histograms: what a fix did to the data."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, image, title in zip(axes[:2], (before, after), titles):
        shown = ax.imshow(image, cmap="gray")
        fig.colorbar(shown, ax=ax, shrink=0.8)
        ax.set_title(title)
        ax.axis("off")
    for image, title in zip((before, after), titles):
        axes[2].hist(image[np.isfinite(image)].ravel(), bins=60, alpha=0.6, label=title)
    axes[2].legend(fontsize=8)
    axes[2].set_title("values")
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def s2_medians(table: pd.DataFrame):
    """Per-band medians of the built chips by period against TerraMind's pretraining means (a +/-1000 band shaded):
    a scene convention 1000 DN away from what TerraMind saw stands out."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = np.arange(len(table))
    mean = table["pretraining mean"].to_numpy(float)
    ax.fill_between(x, mean - 1000, mean + 1000, color="0.9", label="pretraining mean +/- 1000 DN")
    ax.plot(x, mean, "k-", label="pretraining mean")
    for column, marker in zip([c for c in table.columns if c.startswith("median") and not c.endswith("mean")], "os"):
        ax.plot(x, table[column].to_numpy(float), marker, label=column)
    ax.set_xticks(x, table.index)
    ax.set_ylabel("DN")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Sentinel-2 chips against TerraMind's pretraining statistics")
    fig.tight_layout()
    return fig
