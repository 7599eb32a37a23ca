"""Make tests/data/legacy-model-tasks-serving/: a served model saved the way versions were logged
before models-from-code, for tests/test_serving.py to check that such versions still load.

Until then, `tasks.serving.log_ddpm_model` passed a `DDPMImageModel(max_images=..., max_steps=...)`
*instance* as `python_model`, so MLflow cloudpickled it into `python_model.pkl` by reference to
`tasks.serving.DDPMImageModel` (with `max_images`/`max_steps` in the pickled instance's state,
no `model_config`). Registered versions of that kind exist in users' stores and must keep loading.

The committed folder was made with the code of commit b05b039 (the last one before the switch):

    .venv/bin/python tests/data/make_legacy_model.py            # refuses to overwrite the folder
    .venv/bin/python tests/data/make_legacy_model.py --force    # remake it

It trains tests/trained_runs.py's tiny checkpoint (2 steps, seconds on a CPU), keeps its EMA
weights only (tasks.serving.write_ema_checkpoint, ~220 KB) and saves the pyfunc with
`mlflow.pyfunc.save_model` (no input example, pinned pip requirements: nothing is inferred). Run
with newer code, where the class lives in tasks/served_model.py, the pickle is still made to name
`tasks.serving.DDPMImageModel` (the class's `__module__` is pointed there while it is pickled),
so the folder stays what old versions hold (remade with the new code, python_model.pkl came out
byte-identical to the committed one). Either way the script checks the pickle names
`tasks.serving` and loads the model once. The tests need no particular weights: only images
of the right shape and dtype, and the pickled bound (max_images 8).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE / "legacy-model-tasks-serving"
LEGACY_MODULE = "tasks.serving"
MAX_IMAGES = 8
MAX_STEPS = 1000


@contextmanager
def pickled_as_legacy(cls):
    """cloudpickle pickles a class by reference to `cls.__module__`.`cls.__qualname__` when that
    names the class itself; tasks.serving re-exports the class, so this names it as old pickles do."""
    module = cls.__module__
    cls.__module__ = LEGACY_MODULE
    try:
        yield
    finally:
        cls.__module__ = module


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]

    import mlflow
    import torch

    from ddpm.checkpoint import load_checkpoint
    from tasks.serving import DDPMImageModel, model_signature, write_ema_checkpoint
    from trained_runs import tiny_checkpoint

    if args.out.exists():
        if not args.force:
            parser.error(f"{args.out} exists (use --force to remake it)")
        shutil.rmtree(args.out)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "train")
        bundle = Path(tmp) / "checkpoint"
        write_ema_checkpoint(checkpoint, bundle)
        state = load_checkpoint(checkpoint)
        # then: DDPMImageModel(max_images=8), which set both bounds on the instance; now the
        # class takes no arguments. Either way the instance's state is {max_images, max_steps}.
        legacy_model = DDPMImageModel()
        legacy_model.max_images, legacy_model.max_steps = MAX_IMAGES, MAX_STEPS
        with pickled_as_legacy(DDPMImageModel):
            mlflow.pyfunc.save_model(
                str(args.out),
                python_model=legacy_model,
                artifacts={"checkpoint": str(bundle)},
                signature=model_signature(state["model_config"], MAX_IMAGES),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  "numpy", "pandas", "pillow", "pydantic>=2.7,<3"],
            )
    pickled = (args.out / "python_model.pkl").read_bytes()
    assert LEGACY_MODULE.encode() in pickled, f"python_model.pkl does not name {LEGACY_MODULE}"
    images = mlflow.pyfunc.load_model(str(args.out)).predict({"num_images": 2}, params={"steps": 2})
    assert images.shape == (2, 1, 16, 16), images.shape
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {size / 1024:.0f} KiB, python_model.pkl names {LEGACY_MODULE}.DDPMImageModel")
    return args.out


if __name__ == "__main__":
    main()
