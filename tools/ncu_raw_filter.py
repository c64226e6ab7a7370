#!/usr/bin/env python3
"""Prints the metrics of an `ncu --csv --page raw` report whose names match a regular expression, one per line
(name, unit, value; one column a profiled launch). Used by scripts/gpu_check.sh to keep ncu's output short.

    python3 tools/ncu_raw_filter.py REPORT.csv 'regex'
"""
import csv
import re
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: ncu_raw_filter.py REPORT.csv REGEX")
    path, pattern = sys.argv[1], re.compile(sys.argv[2])
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(line for line in f if line.startswith('"'))]
    if len(rows) < 3:
        sys.exit(f"[ncu_raw_filter] {path}: no raw report (expected a header, a unit row and a row per launch)")
    names, units, launches = rows[0], rows[1], rows[2:]
    for i, name in enumerate(names):
        if pattern.search(name):
            print(f"[ncu] {name} ({units[i] if i < len(units) else ''}): " +
                  " ".join(r[i] if i < len(r) else "-" for r in launches))


if __name__ == "__main__":
    main()
