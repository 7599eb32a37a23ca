"""`ddpm`: the pipeline from a terminal. `ddpm --help`, `ddpm <command> --help`.

    ddpm prepare --source digits                       prepare (and fingerprint) a dataset
    ddpm train --steps 2000 --schedule cosine          the training pipeline (one MLflow run)
    ddpm train --recipe mnist --source mnist:DIR       MNIST at full size, official split, Inception FID
    ddpm train --resume <mlflow run id>                continue a crashed or killed training run
    ddpm train --conditional                           class-conditional, classifier-free guidance
    ddpm compare --schedules linear cosine             one pipeline per noise schedule
    ddpm evaluate --run-id <mlflow run id>             FID of a run's checkpoints
    ddpm promote                                       best run by FID -> registry, champion alias
    ddpm retrain                                       retrain if the data or settings changed, then challenge
    ddpm sample --model models:/ddpm@champion --out samples/
    ddpm sample --checkpoint step-0001500.pt --class 3 --guidance 3
    ddpm interpolate --checkpoint step-0001500.pt --a 0 --b 1
    ddpm denoise --checkpoint step-0001500.pt --indices 0 1 2 3 --t 100 500
    ddpm serve                                         serve models:/ddpm@champion on 127.0.0.1:5055, following the alias
    ddpm stack start|stop|status                       the local Prefect + MLflow stack
    ddpm deploy                                        register the flows' deployments

Mistakes in the arguments exit with 2 (argparse); a missing file, an unknown model URI or a
value out of range prints one line on stderr and exits with 1. The package, one concern a module:

    parser.py     the command line; options generated from the config classes, built per command
    configs.py    the parsed options -> PipelineConfig, DataConfig, SamplerConfig, PromoteConfig
    commands.py   prepare, train, compare, evaluate, promote, retrain, stack, deploy
    images.py     sample, interpolate, denoise -> PNGs
    errors.py     the error policy: one line and exit 1, tracebacks to $DDPM_HOME/logs/ddpm.log
"""

from __future__ import annotations

import importlib
import os
import sys

from flows.cli.errors import expected_errors, one_line, stop_on_sigterm
from flows.cli.parser import build_parser, command_of, split_passthrough


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)   # only its options are built: `ddpm --help` imports no torch
    if command == "serve" and "torch" not in sys.modules:
        # OpenMP reads this when torch loads it: idle pool threads sleep instead of spinning. A server
        # drawing small batches beside other work was 20-30x slower per request with spinning threads
        # (docs/serving.md, "Load, limits and stopping")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parsed, passthrough = split_passthrough(argv)
    args = build_parser([command] if command else [], epilog=__doc__.split("\n\n")[1]).parse_args(parsed)
    if passthrough:
        args.script_args = passthrough
    stop_on_sigterm()
    from tasks.settings import ddpm_home

    args.log_file = ddpm_home() / "logs" / "ddpm.log"
    expected = expected_errors()
    logged_before = args.log_file.stat().st_size if args.log_file.is_file() else 0
    module, _, function = args.handler.partition(":")
    try:
        getattr(importlib.import_module(module), function)(args)
    except expected as error:
        logged = args.log_file.is_file() and args.log_file.stat().st_size > logged_before
        hint = f" (full trace: {args.log_file}, or rerun with --verbose)" if logged and not args.verbose else ""
        print(f"ddpm {args.command}: error: {one_line(error)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
