"""Is a row set only by ``target_psnr`` at least as fast as each peer at >= its PSNR? (issue 37)

Reads the JSON that ``compare.py --methods inductor,fastcache_target,...`` wrote for each model
(``compare_target_<model>.json``) and prints, per model, every peer row against the fastest
``fastcache_target`` row (``enable_fastcache(..., target_psnr=T)``, no other option) whose PSNR
is >= the peer's, and the same for the step-level target rows (``fastcache_step_target``). Speed
and PSNR are those of compare.py's run (against its Inductor of the same run); nothing is
re-measured. Writes the markdown to ``--out`` (and the ``compare_target`` section of RESULTS.md
with ``--results-md``).

    python benchmarks/target_vs_peers.py --models dit dit_unseen mmdit wan --results-md benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = ("fbcache", "taylorseer", "magcache", "dbcache", "dbcache_taylorseer")
OURS = {"fastcache_target": "target_psnr only", "fastcache_step_target": "target_psnr, step level"}
BEGIN, END = "<!-- BEGIN compare_target -->", "<!-- END compare_target -->"


def _ok(rows, methods):
    return [r for r in rows if r["method"] in methods and r.get("status") == "ok" and "speedup" in r]


def match(rows: list[dict], method: str, peer: dict) -> dict | None:
    """The fastest ``method`` row with PSNR >= the peer's, or None."""
    cands = [r for r in _ok(rows, (method,)) if r["psnr_db"] >= peer["psnr_db"]]
    return max(cands, key=lambda r: r["speedup"]) if cands else None


def table(model: str, data: dict) -> list[str]:
    rows, meta = data["suite1"]["rows"], data["meta"]
    out = [f"**{model}** ({meta.get('date', '?')}, commit {meta.get('commit', '?')}: `{meta.get('command', '?')}`)", "",
           "| fastcache row | speed | PSNR (dB) | approx. |", "|---|---|---|---|"]
    for r in _ok(rows, tuple(OURS) + ("fastcache_output",)):
        out.append(f"| {r['label']} | {r['speedup']:.2f}x | {r['psnr_db']:.1f} | {r.get('approx_ratio', 0):.2f} |")
    out += ["", "| peer row | speed | PSNR (dB) | " + " | ".join(f"fastest {v} at >= its PSNR" for v in OURS.values())
            + " |", "|---|---|---|" + "---|" * len(OURS)]
    for p in _ok(rows, PEERS):
        cells = []
        for m in OURS:
            best = match(rows, m, p)
            cells.append("none" if best is None else
                         f"T={best['value']:g}: {best['speedup']:.2f}x at {best['psnr_db']:.1f} dB "
                         f"({'holds' if best['speedup'] >= p['speedup'] else 'slower'})")
        out.append(f"| {p['label']} | {p['speedup']:.2f}x | {p['psnr_db']:.1f} | " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["method"] in PEERS and r.get("status") != "ok"]
    for r in failed:
        out.append(f"| {r['label']} | {r.get('status')}: {r.get('reason', '')[:80]} | | |")
    return out + ["", f"![{model}: speed against PSNR, every row](compare_target_{model}.png)", ""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit", "dit_unseen", "mmdit", "wan"])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=None)
    a = p.parse_args(argv)
    lines = []
    for m in a.models:
        f = HERE / f"compare_target_{m}.json"
        if f.exists():
            lines += table(m, json.loads(f.read_text()))
        else:
            lines += [f"**{m}**: not run ({f.name} missing)", ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text)
    if a.results_md:
        md = a.results_md.read_text()
        title = "## Rows set only by `target_psnr` against the peers (`benchmarks/target_vs_peers.py`)"
        body = f"{BEGIN}\n{title}\n\n{text}\n{END}"
        if BEGIN in md:
            md = md[:md.index(BEGIN)] + body + md[md.index(END) + len(END):]
        else:
            md = md.rstrip("\n") + "\n\n" + body + "\n"
        a.results_md.write_text(md)


if __name__ == "__main__":
    main()
