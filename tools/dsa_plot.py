#!/usr/bin/env python3
"""dsa-plot: training curves from one or more metrics.jsonl files, several runs overlaid.

    python3 tools/dsa_plot.py RUN [RUN ...] [--out DIR] [--smooth N]
    build/bin/dsa-train plot RUN [RUN ...] [--out DIR] [--smooth N]

RUN is a run's output directory (holding metrics.jsonl), a metrics.jsonl path, or LABEL=PATH; the label
defaults to the run directory's name. Writes DIR/loss.png (lm_loss solid, val_lm_loss dashed with
markers), DIR/indexer_kl.png (indexer_kl, val_indexer_kl), DIR/recall.png (recall) and DIR/lr.png
against the global step, with stage boundaries marked. Stages are laid end to end by name in their
order of first appearance, each as long as its longest run, so an ablation that ran only the sparse
stage lines up with the baseline's sparse stage. Needs python3-matplotlib (Debian).
"""
import argparse
import json
import math
import os
import sys


def parse_run(spec):
    label = None
    if "=" in spec and not os.path.exists(spec):
        label, spec = spec.split("=", 1)
    path = os.path.join(spec, "metrics.jsonl") if os.path.isdir(spec) else spec
    if label is None:
        folder = os.path.dirname(os.path.abspath(path))
        label = os.path.basename(folder) or path
    return label, path


def read_metrics(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"[plot] {path}:{lineno}: not JSON: {e}")
            if not isinstance(rec, dict) or "stage" not in rec or "step" not in rec:
                sys.exit(f"[plot] {path}:{lineno}: a record needs 'stage' and 'step'")
            records.append(rec)
    return records


def stage_layout(runs):
    """Stage order (first appearance over all runs) and each stage's offset on the global axis."""
    order, length = [], {}
    for _, recs in runs:
        for r in recs:
            s = r["stage"]
            if s not in length:
                order.append(s)
                length[s] = 0
            length[s] = max(length[s], int(r["step"]))
    offset, x = {}, 0
    for s in order:
        offset[s] = x
        x += length[s]
    return order, offset, x


def smooth(ys, n):
    if n <= 1:
        return ys
    out, acc, window = [], 0.0, []
    for y in ys:
        window.append(y)
        acc += y
        if len(window) > n:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def series(recs, key, offset):
    """One (xs, ys) segment per stage, in stage order: curves do not join across stage boundaries."""
    segments = {}
    for r in recs:
        v = r.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        xs, ys = segments.setdefault(r["stage"], ([], []))
        xs.append(offset[r["stage"]] + int(r["step"]))
        ys.append(float(v))
    return sorted(segments.values(), key=lambda seg: seg[0][0])


def plot(runs, out_dir, smooth_n, plt):
    order, offset, end = stage_layout(runs)
    figures = [
        ("loss.png", "LM loss", [("lm_loss", "-", False), ("val_lm_loss", "--", True)]),
        ("indexer_kl.png", "indexer KL", [("indexer_kl", "-", False), ("val_indexer_kl", "--", True)]),
        ("recall.png", "indexer recall (held out)", [("recall", "-", True)]),
        ("lr.png", "learning rate", [("lr", "-", False)]),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for filename, title, keys in figures:
        if not any(r.get(k) is not None for _, recs in runs for r in recs for k, _, _ in keys):
            continue
        fig, ax = plt.subplots(figsize=(9, 5))
        for i, (label, recs) in enumerate(runs):
            color = colors[i % len(colors)]
            for key, style, markers in keys:
                for j, (xs, ys) in enumerate(series(recs, key, offset)):
                    if not markers:
                        ys = smooth(ys, smooth_n)
                    ax.plot(xs, ys, style, color=color, marker="o" if markers else None, markersize=3,
                            label=f"{label} {key}" if j == 0 else None)
        for s in order:
            ax.axvline(offset[s], color="0.6", linewidth=0.8, linestyle=":")
            ax.annotate(s, (offset[s], 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="0.35")
        ax.set_xlim(0, max(end, 1))
        ax.set_xlabel("global step (stages end to end)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv):
    ap = argparse.ArgumentParser(prog="dsa-train plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run dir, metrics.jsonl, or LABEL=PATH")
    ap.add_argument("--out", default="runs/plots", help="folder for the PNG files (default runs/plots)")
    ap.add_argument("--smooth", type=int, default=1, help="moving average over N training records")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("[plot] matplotlib is missing: apt-get install python3-matplotlib "
                 "(and run Debian's /usr/bin/python3, or set DSA_PYTHON)")
    runs = []
    for spec in args.runs:
        label, path = parse_run(spec)
        if not os.path.isfile(path):
            sys.exit(f"[plot] {path}: no such metrics file")
        runs.append((label, read_metrics(path)))
    os.makedirs(args.out, exist_ok=True)
    written = plot(runs, args.out, args.smooth, plt)
    if not written:
        sys.exit("[plot] the metrics files hold no values to plot")
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
