"""Train on a prepared dataset from the command line, in one process or many under torchrun.

    torchrun --nproc_per_node=2 -m ddpm.train_ddp --data DATA_DIR --checkpoint-dir CKPT_DIR \
        --model tiny-16 --train '{"steps": 1000, "batch_size": 64}' --result result.json
    python -m ddpm.train_ddp ...             # the same, one process (no torchrun variables)

--model is a preset name, a JSON object, or a JSON file; --diffusion and --train a JSON object
or file. batch_size is the global batch: each of the world_size ranks trains on its slice
(batch_size / world_size, in grad_accum_steps micro-batches). Rerunning the same command
resumes from the newest valid checkpoint in CKPT_DIR. Rank 0 writes the checkpoints and the
--result JSON (step, resumed_from, loss_history, checkpoints, images_per_second, compile_seconds,
world_size).
With --events, rank 0 prints each log window and checkpoint as a line `@ddpm-event {json}` and
any rank prints its error the same way before it exits: the worker end of the protocol in
ddpm.torchrun, whose `train_under_torchrun` launches this command and reads them.
A mistake the user can fix (a setting, the data, a checkpoint of other settings, a NaN loss, a
missing file) is one line on stderr and exit status 1; --verbose shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ddpm.diffusion import DiffusionConfig
from ddpm.errors import one_line
from ddpm.distributed import DistributedContext, cleanup, init_distributed, launched_by_torchrun
from ddpm.torchrun import emit_event, parent_death_signal
from ddpm.training import REPEATING_ERRORS, TrainConfig, check_device, dataset_trainer, is_repeating, resolve_device
from ddpm.unet import PRESETS, UNetConfig, preset


def _json_arg(text: str) -> dict:
    """A JSON object given inline or as a file path."""
    text = text.strip()
    return json.loads(text if text.startswith("{") else Path(text).read_text())


def _model_arg(text: str) -> UNetConfig:
    return preset(text) if text in PRESETS else UNetConfig(**_json_arg(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm.train_ddp", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="prepared dataset folder (ddpm.data.prepare_dataset)")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--model", default="tiny-16", help=f"preset ({', '.join(PRESETS)}), JSON object or file")
    parser.add_argument("--diffusion", default="{}", help="DiffusionConfig as a JSON object or file")
    parser.add_argument("--train", default="{}", help="TrainConfig as a JSON object or file")
    parser.add_argument("--result", help="write a JSON summary here (rank 0)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--events", action="store_true", help="print log, checkpoint and error events (JSON lines)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        return _train(args)
    except (*REPEATING_ERRORS, OSError) as error:
        if args.verbose:
            raise
        print(f"{parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return 1


def _train(args) -> int:
    try:
        model_config = _model_arg(args.model)
        diffusion_config = DiffusionConfig(**_json_arg(args.diffusion))
        train_config = TrainConfig(**_json_arg(args.train))
    except json.JSONDecodeError as error:
        raise ValueError(f"--model, --diffusion and --train take a JSON object or file: {error}") from None
    check_device(train_config.device)
    if launched_by_torchrun() and (set_signal := parent_death_signal()):
        set_signal()   # a killed torchrun takes its workers with it
    ctx = DistributedContext()
    try:
        # gloo for CPU training even on a CUDA machine (NCCL needs the tensors on GPUs)
        ctx = init_distributed("gloo" if resolve_device(train_config.device).type == "cpu" else None)
        trainer = dataset_trainer(args.data, model_config, diffusion_config, train_config, args.checkpoint_dir, ctx)
        hooks = {}
        if args.events:
            hooks = {"on_log": lambda step, metrics: emit_event("log", step=step, metrics=metrics),
                     "on_checkpoint": lambda step, path: emit_event("checkpoint", step=step, path=str(path))}
        result = trainer.train(progress=not args.no_progress, **hooks)
        if ctx.is_main and args.result:
            Path(args.result).write_text(json.dumps({
                "step": result.step,
                "resumed_from": result.resumed_from,
                "loss_history": result.loss_history,
                "checkpoints": [str(p) for p in result.checkpoints],
                "images_per_second": result.images_per_second,
                "compile_seconds": result.compile_seconds,
                "world_size": ctx.world_size,
            }, indent=1))
    except BaseException as error:
        if args.events and not isinstance(error, KeyboardInterrupt):
            emit_event("error", rank=int(os.environ.get("RANK", ctx.rank)), type=type(error).__name__,
                       message=str(error).split("\n")[0], retryable=not is_repeating(error))
        raise
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
