#!/usr/bin/env python3
"""dsa-eval report: plots and a markdown table from one or more dsa-eval JSON files, models side by side.

    python3 tools/dsa_eval_report.py EVAL.json [LABEL=EVAL.json ...] [--out DIR] [--markdown FILE]
    build/bin/dsa-eval CKPT --data SHARDS ... --plots DIR      (runs this on its own JSON)

Writes into DIR: loss_by_position.png (held-out loss per position bucket, one line per model, context
length and attention: dense solid, sparse dashed), needle.png (needle accuracy as heatmaps, context length
x depth, one panel per model and attention), indexer_layers.png (attention-mass recall per layer, solid,
and the oracle recall of the dense attention's own top-k, dotted). Prints the markdown table (or writes
it to --markdown). The label of a file defaults to the "label" it holds. Needs python3-matplotlib.
"""
import argparse
import json
import os
import sys

BUCKET_NAMES = ["0-512", "512-2K", "2K-8K", "8K-32K", "32K-128K", "128K-512K"]


def load(spec):
    label = None
    if "=" in spec and not os.path.exists(spec):
        label, spec = spec.split("=", 1)
    try:
        with open(spec, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"[eval-report] {spec}: {e}")
    if data.get("format") != "dsa-eval-1":
        sys.exit(f"[eval-report] {spec}: not a dsa-eval JSON file (format {data.get('format')!r})")
    return label or data.get("label") or os.path.basename(spec), data


def bucket_index(b):
    """Position buckets are [0, 512), [512, 2048), ... (x4); the last one is cut at the context length."""
    i, end = 0, 512
    while b["begin"] >= end:
        i, end = i + 1, end * 4
    return i


def fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def table(models):
    n_buckets = max((bucket_index(b) + 1 for _, d in models for r in d["results"] for b in r["loss_by_position"]),
                    default=0)
    head = ["model", "context", "attention", "loss"] + [f"loss {BUCKET_NAMES[i]}" for i in range(n_buckets)]
    head += ["needle", "recall", "oracle", "overlap", "KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, d in models:
        for r in d["results"]:
            cells = [label, str(r["seq_len"]) + (" (extrapolation)" if r["extrapolation"] else ""),
                     r["attention"] + ("" if r["complete"] else " (cut by the time limit)"), fmt(r["loss"])]
            by = {bucket_index(b): b for b in r["loss_by_position"] if b["tokens"] > 0}
            cells += [fmt(by[i]["loss"]) if i in by else "-" for i in range(n_buckets)]
            cells.append(fmt(r["needle"].get("accuracy"), 3))
            ix = r.get("indexer") or {}
            cells += [fmt(ix.get(k), 3) for k in ("recall", "oracle_recall", "overlap", "kl")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_loss(models, out, plt):
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k = 0
    for label, d in models:
        for seq_len in sorted({r["seq_len"] for r in d["results"]}):
            color = colors[k % len(colors)]
            k += 1
            for r in d["results"]:
                if r["seq_len"] != seq_len:
                    continue
                pts = [(bucket_index(b), b["loss"]) for b in r["loss_by_position"] if b["tokens"] > 0]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "-" if r["attention"] == "dense" else "--", color=color, marker="o", markersize=4,
                        label=f"{label} {seq_len} {r['attention']}")
    n = max((bucket_index(b) + 1 for _, d in models for r in d["results"] for b in r["loss_by_position"]), default=1)
    ax.set_xticks(range(n))
    ax.set_xticklabels(BUCKET_NAMES[:n])
    ax.set_xlabel("token position (bucket)")
    ax.set_ylabel("held-out LM loss")
    ax.set_title("loss by position: dense (solid) and sparse (dashed) attention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "loss_by_position.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_needle(models, out, plt):
    panels = [(label, d, mode) for label, d in models for mode in ("dense", "sparse")
              if any(r["attention"] == mode and sum(r["needle"]["trials"]) > 0 for r in d["results"])]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    for ax, (label, d, mode) in zip(axes[0], panels):
        rows = [r for r in d["results"] if r["attention"] == mode and sum(r["needle"]["trials"]) > 0]
        depths = d["needle_depths"]
        grid = [r["needle"]["accuracy_by_depth"] for r in rows]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)))
        ax.set_xticklabels([f"{int(round(100 * x))}%" for x in depths])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([str(r["seq_len"]) + ("*" if r["extrapolation"] else "") for r in rows])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
        ax.set_xlabel("needle depth")
        if ax is axes[0][0]:
            ax.set_ylabel("context (* extrapolation)")
        ax.set_title(f"{label}: {mode}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path = os.path.join(out, "needle.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(models, out, plt):
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k, any_line = 0, False
    for label, d in models:
        for r in d["results"]:
            layers = (r.get("indexer") or {}).get("layers") or []
            if not layers:
                continue
            color = colors[k % len(colors)]
            k += 1
            xs = [l["layer"] for l in layers]
            ax.plot(xs, [l["recall"] for l in layers], "-", color=color, marker="o", markersize=4,
                    label=f"{label} {r['seq_len']} {r['attention']} recall")
            ax.plot(xs, [l["oracle_recall"] for l in layers], ":", color=color)
            any_line = True
    if not any_line:
        plt.close(fig)
        return None
    ax.set_ylim(0, 1.02)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the dense attention mass")
    ax.set_title("indexer recall per layer (solid); the dense top-k's own mass (dotted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "indexer_layers.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evals", nargs="+", help="dsa-eval JSON files, or LABEL=PATH")
    ap.add_argument("--out", help="folder for the PNG files (none: no plots)")
    ap.add_argument("--markdown", help="write the table there instead of printing it")
    args = ap.parse_args(argv)
    models = [load(s) for s in args.evals]
    md = table(models)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(md)
    else:
        print(md, end="")
    if args.out:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit("[eval-report] matplotlib is missing: apt-get install python3-matplotlib "
                     "(and run Debian's /usr/bin/python3, or set DSA_PYTHON)")
        os.makedirs(args.out, exist_ok=True)
        for p in (plot_loss(models, args.out, plt), plot_needle(models, args.out, plt),
                  plot_layers(models, args.out, plt)):
            if p:
                print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
