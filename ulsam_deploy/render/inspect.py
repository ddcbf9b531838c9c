"""Render ``inspect`` and ``export --keep-float auto`` results: Rich tables, and the one PNG of
per-layer error curves with the attention maps of every ULSAM position, eager beside each artifact."""

from __future__ import annotations

from rich.table import Table

from .report import table

INT16_MAX = 32767


def _num(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def layer_table(inspection, artifact) -> Table:
    """One artifact's rows in network order; ULSAM layers marked, the first jump flagged."""
    rows = []
    for row in artifact.rows:
        layer = row.label + (" ULSAM" if row.ulsam and row.kind == "output" else "")
        mark = "<- first jump" if row.kind == "output" and row.label == artifact.first_jump else ""
        pair = artifact.pair_bounds.get(row.layer) if row.kind == "output" else None
        rows.append((layer, row.observed, _pair(pair), _num(row.cosine_mean, ".6f"), _num(row.cosine_min, ".6f"),
                     _num(row.rel_error, ".2e"), _num(row.sqnr_db, ".1f"), _num(row.drop_db, "+.1f"),
                     _num(row.argmax_agreement, ".1f"),
                     "-" if row.spread_mean is None else f"{row.eager_spread_mean:.2f} / {row.spread_mean:.2f}", mark))
    proof = ("probe logits identical to the artifact's" if artifact.logits_identical
             else f"PROBE DIFFERS from the artifact: max |logit diff| {artifact.logits_max_diff:.3g}")
    floats = f"; kept float: {', '.join(map(str, artifact.keep_float))}" if artifact.keep_float else ""
    jump = f"first jump at layer {artifact.first_jump}" if artifact.first_jump else "no jump"
    return table(f"{artifact.artifact} ({artifact.backend} {artifact.precision}) vs eager fp32 - {inspection.data}, "
                 f"{artifact.count} images",
                 ("layer", "observed", "int16 pair", "cos mean", "cos min", "rel err", "SQNR dB", "drop dB", "argmax agr %",
                  "spread eager / here", ""),
                 rows, caption=f"{jump}; {proof}{floats}; spread of an attention map: (max - min) x H*W, "
                               "0 when uniform, mean over maps" + (
                                   f"; int16 pair: the largest |a1*w1 + a2*w2| the layer's INT8 weights allow "
                                   f"(! beyond 32767: saturates on x86 without VNNI); {artifact.kernels}"
                                   if artifact.kernels else ""))


def _pair(bound: int | None) -> str:
    if bound is None:
        return "-"
    return f"{bound}" + (" !" if bound > INT16_MAX else "")


def summary_table(inspection) -> Table:
    rows = [(a.artifact, a.precision, a.first_jump or "-", _num(min((r.sqnr_db for r in a.rows if r.kind == "output" and r.sqnr_db is not None),
                                                                    default=None), ".1f"),
             _num(next((r.sqnr_db for r in a.rows if r.kind == "logits"), None), ".1f"),
             "yes" if a.logits_identical else f"NO ({a.logits_max_diff:.3g})") for a in inspection.artifacts]
    return table(f"Where the error starts - {inspection.directory}",
                 ("artifact", "precision", "first jump", "worst layer SQNR dB", "logits SQNR dB", "probe = artifact"),
                 rows)


def float_step_table(search) -> Table:
    """One row per step of ``--keep-float auto``: the layer added, parity and latency after it."""
    rows = []
    for step in search.steps:
        for i, r in enumerate(step.results):
            rows.append(("start" if step.layer is None and i == 0 else (str(step.layer) if i == 0 else ""),
                         ",".join(map(str, step.keep_float)) or "-" if i == 0 else "",
                         f"{step.mac_share:.1f}" if i == 0 else "", r.artifact, f"{r.top1_agreement:.2f}",
                         "-" if r.accuracy_delta is None else f"{r.accuracy_delta:+.2f}", f"{r.max_abs:.3g}",
                         _num(step.latency_ms.get(r.artifact), ".2f"), "pass" if r.passed else "FAIL"))
    caption = (f"chosen: {', '.join(map(str, search.chosen)) or 'none'} ({search.mac_share:.1f} % of MACs in float, "
               f"budget {search.budget:g} %); {search.stop}")
    return table("--keep-float auto", ("added", "float layers", "MACs %", "artifact", "top-1 agr %", "acc delta",
                                       "max abs", "p50 ms", "check"), rows, caption=caption)


def plot_inspection(inspection, samples, path) -> None:
    """One PNG: SQNR per layer (one line per quantised artifact), then for each ULSAM position and each
    kept image a row - input, eager attention per group, each artifact's attention per group - on one
    colour scale per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..store.fileio import atomic_path

    keys = list(samples.eager)
    shown = [a for a in inspection.artifacts if a.precision != "fp32"] or inspection.artifacts
    artifacts = [a.artifact for a in shown if a.artifact in samples.artifacts]
    groups = samples.eager[keys[0]].shape[1] if keys else 0
    cols = 1 + groups * (1 + len(artifacts))
    grid_rows = len(keys) * len(samples.images)
    fig = plt.figure(figsize=(max(9.0, 0.9 * cols), 3.6 + 0.95 * grid_rows))
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, 0.95 * max(grid_rows, 1)], hspace=0.02)
    _curves(top.add_subplot(), inspection, shown)
    axes = bottom.subplots(max(grid_rows, 1), cols + 1, squeeze=False,   # the last, narrow column: colour bars
                           gridspec_kw={"wspace": 0.06, "hspace": 0.12, "width_ratios": [1.0] * cols + [0.12]})
    for p, key in enumerate(keys):
        label = key.split(".")[0].replace("layer", "layer ").replace("ulsam", "ULSAM after ")
        for i, image in enumerate(samples.images):
            row = axes[p * len(samples.images) + i]
            blank = np.full_like(samples.eager[key][i], np.nan)     # a map the probe could not read
            maps = [samples.eager[key][i]] + [samples.artifacts[a][key][i] if key in samples.artifacts[a] else blank
                                              for a in artifacts]
            vmax = max(float(np.nanmax(m)) for m in maps if not np.isnan(m).all())
            row[0].imshow(image)
            row[0].set_ylabel(f"{label}\nimage {i + 1}", fontsize=7)
            for s, (name, m) in enumerate(zip(["eager fp32"] + artifacts, maps)):
                for g in range(groups):
                    ax = row[1 + s * groups + g]
                    drawn = ax.imshow(m[g], cmap="viridis", vmin=0.0, vmax=vmax)
                    if p == 0 and i == 0:
                        ax.set_title(f"{name}\ngroup {g + 1}" if g == 0 else f"\ngroup {g + 1}", fontsize=7,
                                     loc="left" if g == 0 else "center")
            for ax in row[:-1]:
                ax.set_xticks([]), ax.set_yticks([])
            bottom.colorbar(drawn, cax=row[-1]).ax.tick_params(labelsize=5)
    top.suptitle(f"{inspection.model}: quantised artifacts vs eager fp32 by paper layer ({inspection.data}, "
                 f"{inspection.count} images). Below: ULSAM attention maps, one colour scale per row", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _curves(ax, inspection, artifacts) -> None:
    """SQNR (dB) of every layer output and of the logits, one line per artifact; ULSAM layers shaded."""
    first = inspection.artifacts[0]
    labels = [r.label for r in first.rows if r.kind != "attention"]
    jumps: dict[str, list[tuple[str, float]]] = {}
    for a in artifacts:
        by_label = {r.label: r for r in a.rows if r.kind != "attention"}
        ys = [min(by_label[lab].sqnr_db, 140.0) if lab in by_label and by_label[lab].sqnr_db is not None
              else float("nan") for lab in labels]
        ax.plot(range(len(labels)), ys, marker="o", markersize=3, label=a.artifact)
        if a.first_jump in labels:
            jumps.setdefault(a.first_jump, []).append((a.artifact, ys[labels.index(a.first_jump)]))
    for label, marked in jumps.items():   # one note per layer, naming every artifact whose error jumps there
        x = labels.index(label)
        ax.annotate(f"first jump: {', '.join(name for name, _ in marked)}", (x, max(y for _, y in marked)),
                    xytext=(14, 18), textcoords="offset points", fontsize=7, arrowprops={"arrowstyle": "->"})
    for x, lab in enumerate(labels):
        if any(r.ulsam and r.label == lab for r in first.rows):
            ax.axvspan(x - 0.4, x + 0.4, color="0.88", zorder=0)
    ax.set_xticks(range(len(labels)), [lab + ("\nULSAM" if any(r.ulsam and r.label == lab for r in first.rows) else "")
                                       for lab in labels], fontsize=7)
    ax.set_xlabel("paper layer (output), then the logits", fontsize=8)
    ax.set_ylabel("SQNR vs eager fp32, dB\n(higher is closer)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, len(artifacts)))
