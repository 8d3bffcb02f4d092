"""The conformance table of docs/supported-models.md: ``zoo_classes.check`` on every class
(batch 1, tiny config, 5-step scripted trajectory), printed as markdown and written to
benchmarks/conformance.json. The same checks run in tests/test_conformance_image.py / _video.py.

    python benchmarks/conformance.py [--only NAME ...] [--out benchmarks/conformance.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

from fastcache_fx import zoo_classes


def result(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    ok = (not row["fallback"] and row["off_rel_err"] < 1e-4 and row["approx_ratio"] > 0 and row["finite"])
    return "cached" if ok else "FAILS: " + ("; ".join(row["fallback"])[:120] or f"off_rel_err {row['off_rel_err']:.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="class names (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("conformance.json")))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.only or sorted(zoo_classes.SPECS, key=lambda n: (zoo_classes.SPECS[n].kind, n)):
        torch._dynamo.reset()
        try:
            row = zoo_classes.check(name)
        except Exception as e:  # a row per class, whatever happens
            traceback.print_exc()
            row = {"cls": name, "kind": zoo_classes.SPECS[name].kind, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        row["result"] = result(row)
        row["note"] = zoo_classes.SPECS[name].note
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| class | kind | block lists | blocks | streams per block | graphs | off vs eager | approximated | result |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['cls']} | {r['kind']} | | | | | | | {r['result']} |")
            continue
        graphs = ", ".join(f"{k} {v}" for k, v in r["graphs"].items())
        print(f"| {r['cls']} | {r['kind']} | {', '.join(r['block_lists'])} | {r['blocks']} | "
              f"{'/'.join(map(str, r['streams']))} | {graphs} | {r['off_rel_err']:.1e} | {r['approx_ratio']:.2f} | "
              f"{r['result']} |")
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0 if all(r["result"] == "cached" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
