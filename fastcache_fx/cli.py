"""The ``fastcache-fx`` command: demo, calibrate, explain, diff, export, tune.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up and turns bad input into clear messages.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module implementing add_arguments/run
COMMANDS = {
    "demo": ("fastcache_fx.demo", "baseline vs fastcache on a bundled reference model (--model dit | mmdit | wan | dit_unseen)"),
    "calibrate": ("fastcache_fx.calibration.cli", "fit linear block maps (ridge) on the reference model"),
    "explain": ("fastcache_fx.debug.explain_cli", "show the blocks found and the graph diff of each pass"),
    "diff": ("fastcache_fx.debug.diff_cli", "compare two graph dumps or export manifests"),
    "export": ("fastcache_fx.deploy.cli", "write an AOTInductor package or TensorRT engines of the cached graph"),
    "tune": ("fastcache_fx.tune", "sweep a quality knob on a reference model and pick the options for a target PSNR"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcache-fx", description="FastCache as a torch.compile backend")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in COMMANDS.items():
        try:
            module = importlib.import_module(mod)
        except ImportError:
            continue  # subcommand not available in this build
        sp = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastcache-fx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
