#!/usr/bin/env python3
"""Summary table of dsa-bench and bench_peers.py results (JSON lines), with ratios to the peers.

Usage: python3 tools/bench_table.py RESULTS.jsonl [...]
"""
import json
import sys


def load(paths):
    recs = []
    for p in paths:
        with open(p) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


def main():
    recs = load(sys.argv[1:])
    ours_train = {(r["stage"], r["seq_len"]): r for r in recs if r.get("bench") == "train" and not r.get("recompute")}
    long_train = {(r["stage"], r["seq_len"]): r for r in recs if r.get("bench") == "train" and r.get("recompute")}
    peers_train = {(r["model"], r["seq_len"]): r for r in recs if r.get("bench") == "peer_train"}
    ours_k = {r["name"]: r for r in recs if r.get("bench") == "kernel"}
    peers_k = {r["name"]: r for r in recs if r.get("bench") == "peer_kernel"}
    # Like with like: the dense stage against transformers' dense-attention model, the warm-up against the
    # same warm-up step written in PyTorch, the sparse stage against transformers' V3.2 class, which scores
    # the indexer and masks dense attention to the top-k (no sparse kernel): "masked dense".
    peer_of = {"dense": "DeepseekV3", "warmup": "PyTorch warm-up step", "sparse": "DeepseekV32 (masked dense)"}

    def fmt_tps(r):
        if r is None:
            return "-"
        if "error" in r:
            return str(r["error"]) if isinstance(r["error"], str) else "failed"
        return f"{r['tokens_per_s'] / 1e3:.1f}K"

    params = next((r["parameters"] for r in ours_train.values() if "parameters" in r), None)
    # A section without rows (`gpu_check.sh long` measures the long-context rows alone) is left out.
    if ours_train or peers_train:
        print(f"\n## Training step, bench-small ({params / 1e6:.1f}M parameters)" if params else
              "\n## Training step, bench-small")
        print(f"| stage | seq | tokens/step | ours tok/s | MFU | peak GB | peer | peer tok/s | peer GB | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for (stage, L), r in sorted(ours_train.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            peer = peers_train.get((peer_of.get(stage, ""), L))
            ratio = "-"
            if peer and "tokens_per_s" in peer and "tokens_per_s" in r:
                ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x"
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            gb = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-"
            pgb = f"{peer['peak_gb']:.1f}" if peer and "peak_gb" in peer else "-"
            tok = f"{r['tokens'] // 1024}K" if "tokens" in r else "-"
            print(f"| {stage} | {L} | {tok} | {fmt_tps(r)} | {mfu} | {gb} | {peer_of.get(stage, '-')} | {fmt_tps(peer)} | {pgb} | {ratio} |")

    if long_train:
        # Goals (issue "Speed"): sparse >= 3x dense at 64K and >= 5x at 128K; the warm-up step <= 2x the dense step.
        print("\n## Long context, bench-small, one sequence per step, recompute")
        print("| seq | dense tok/s | warm-up tok/s | sparse tok/s | peak GB d/w/s | sparse / dense | warm-up step / dense step |")
        print("|---|---|---|---|---|---|---|")
        for L in sorted({k[1] for k in long_train}):
            d, w, sp = (long_train.get((st, L)) for st in ("dense", "warmup", "sparse"))
            ok = lambda r: r is not None and "tokens_per_s" in r
            gb = "/".join(f"{r['peak_gb']:.1f}" if ok(r) else "-" for r in (d, w, sp))
            sd = f"{sp['tokens_per_s'] / d['tokens_per_s']:.2f}x" if ok(sp) and ok(d) else "-"
            wd = f"{d['tokens_per_s'] / w['tokens_per_s']:.2f}x" if ok(w) and ok(d) else "-"
            print(f"| {L} | {fmt_tps(d)} | {fmt_tps(w)} | {fmt_tps(sp)} | {gb} | {sd} | {wd} |")

    if not (ours_k or peers_k):
        return
    print("\n## Kernels (production DSA shapes)")
    print("| kernel | ours ms | ours TFLOP/s | peer ms | peer TFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in sorted(set(ours_k) | set(peers_k)):
        o, p = ours_k.get(name), peers_k.get(name)
        oms = f"{o['ms']:.3f}" if o and "ms" in o else "-"
        otf = f"{o['tflops']:.0f}" if o and o.get("tflops") else "-"
        pms = f"{p['ms']:.3f}" if p and "ms" in p else (p.get("error", "-") if p else "-")
        ptf = f"{p['tflops']:.0f}" if p and "tflops" in p else "-"
        sp = f"{p['ms'] / o['ms']:.2f}x" if o and p and "ms" in o and "ms" in p else "-"
        print(f"| {name} | {oms} | {otf} | {pms} | {ptf} | {sp} |")


if __name__ == "__main__":
    main()
