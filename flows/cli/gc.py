"""`ddpm gc`: retention (tasks/retention.py) on demand: what DDPM_HOME keeps and what it frees."""
from __future__ import annotations

import argparse


def gc_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed and freed; remove nothing")
    parser.add_argument("--keep-runs", type=int, default=None,
                        help="the newest training runs of each experiment that keep their checkpoints "
                             "(default $DDPM_KEEP_RUNS, else 3)")
    parser.add_argument("--verbose-list", action="store_true", help="list every path with its size and reason")


def gc(args) -> None:
    from tasks import retention

    if args.keep_runs is not None and args.keep_runs < 0:
        raise ValueError(f"--keep-runs must be >= 0, got {args.keep_runs}")
    result = retention.collect(keep=args.keep_runs, dry_run=args.dry_run)
    removed = result["removed"]
    if args.verbose_list or args.dry_run:
        for path, size, why in removed:
            print(f"{size / 2**20:9.1f} MiB  {path}  ({why})")
    amount = result["would_free" if args.dry_run else "freed"]
    verb = "would free" if args.dry_run else "freed"
    print(f"ddpm gc: {verb} {amount / 2**20:.1f} MiB in {len(removed)} paths; kept {len(result['kept_runs'])} runs' "
          f"files; DDPM_HOME holds {result['home_bytes'] / 2**20:.1f} MiB")
