"""What a person does with a trained model at a terminal: sample, interpolate, denoise -> PNG files.

The images come from ddpm.sampling (a checkpoint) or a registered model (tasks.experiments); no
Prefect flow runs, so these start in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.cli.commands import print_json
from flows.cli.configs import sampler_config
from flows.cli.errors import CLIError


def output_path(given: str | None, default_name: str, folder: bool) -> Path:
    """Where a command writes: `given`, else $DDPM_HOME/outputs/`default_name` (not the current
    folder, often a source checkout); its folder made and checked writable before any sampling
    (a path under a file failed only after minutes of work)."""
    from tasks.settings import ddpm_home

    path = Path(given) if given else ddpm_home(create=True) / "outputs" / default_name
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in [target, *target.parents] if p.exists() and not p.is_dir()), target)
        raise CLIError(f"--out {path}: {blocking} is a file, not a folder") from None
    if not os.access(target, os.W_OK):
        raise CLIError(f"--out {path}: cannot write into {target}")
    return path


def require_file(path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")


def sample(args) -> None:
    from ddpm.sampling import write_images
    from tasks.experiments import is_model_uri, sample_images

    if args.model and not is_model_uri(args.model):
        raise CLIError(f"--model takes a models:/<name>@<alias> or models:/<name>/<version> URI, got {args.model!r}")
    out = output_path(args.out, "samples", folder=True)
    images = sample_images(args.model or args.checkpoint, sampler_config(args, args.num_images))
    print_json(write_images(images, out))


def interpolate(args) -> None:
    from tasks.experiments import interpolation_grid, real_images

    require_file(args.checkpoint)
    out = output_path(args.out, "interpolation.png", folder=False)
    x0 = real_images(args.dataset, [args.a, args.b], args.split)
    print_json(interpolation_grid(args.checkpoint, x0[0], x0[1], args.t, args.num, sampler_config(args),
                                  str(out), args.run_id))


def denoise(args) -> None:
    from tasks.experiments import denoising_grid, real_images

    require_file(args.checkpoint)
    out = output_path(args.out, "denoising.png", folder=False)
    x0 = real_images(args.dataset, args.indices, args.split)
    print_json(denoising_grid(args.checkpoint, x0, args.t, sampler_config(args), str(out), args.run_id))
