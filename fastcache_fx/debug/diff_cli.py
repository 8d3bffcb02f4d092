"""``fastcache-fx diff A B``: compare two graph dumps, two export manifests or two dump folders.

    fastcache-fx explain --model dit --dump before/    # ... change something ...
    fastcache-fx explain --model dit --dump after/
    fastcache-fx diff before/graph_0_after.txt after/graph_0_after.txt
    fastcache-fx diff run_a/manifest.json run_b/manifest.json
    # config.cache_ratio_threshold: 0.05 -> 0.1

Exit status: 0 identical, 1 different, 2 bad input (missing file, invalid JSON).
"""

from __future__ import annotations

import argparse
import sys

from .diff import diff_paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="first graph dump (.txt), manifest (.json) or folder")
    p.add_argument("b", help="second graph dump, manifest or folder")
    p.add_argument("-U", "--context", type=int, default=3, help="context lines of text diffs (default 3)")


def run(args) -> int:
    if args.context < 0:
        raise ValueError("--context: must be >= 0")
    result = diff_paths(args.a, args.b, args.context)
    if result.same:
        print(f"identical ({result.kind})")
        return 0
    sys.stdout.write(result.text())
    return 1
