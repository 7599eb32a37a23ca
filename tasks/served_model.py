"""The served model's code: an MLflow pyfunc that draws images from a bundled EMA checkpoint.

    DDPMImageModel      predict({"num_images": n}, params) -> n images
    DEFAULT_PARAMS      the request params and their defaults (declared in the model's signature)

This file is logged *as code* (MLflow's models-from-code): tasks.serving.log_ddpm_model passes
its path as `python_model`, MLflow copies it into the model next to MLmodel, and loading the
model runs the copy under a throwaway module name; the `mlflow.models.set_model` call at the
end hands MLflow the instance. Nothing is pickled, so the model names no `tasks` module and
loads in any process where the `ddpm` package (and MLflow, numpy, pandas, Pillow) can be
imported, even one where another top-level package called `tasks` wins the import.

So the file is self-contained: it imports `ddpm.*`, mlflow, numpy, pandas and PIL, never this
project's `tasks` package. A logged model keeps the copy it was logged with: the `ddpm` names
used here (load_model, list_checkpoints, the samplers with image_generators, per_image_noise and
reverse_process, ClassifierFreeGuidance, to_uint8, MAX_GUIDANCE_SCALE) are an API that every
registered model calls, to be kept when the package changes.

`prepare` + `draw` are what `ddpm serve` calls to draw several requests in one batch (dynamic
batching); `predict` is the two for one request. A version registered before they existed has
`predict` only, and is served one request at a time.

The request bounds are MLflow model config, not constructor arguments: log_ddpm_model passes
`model_config={"max_images": ..., "max_steps": ...}` (stored in MLmodel, overridable with
`mlflow.pyfunc.load_model(uri, model_config=...)`) and `load_context` reads it. Versions logged
before this file existed hold a cloudpickled instance of this class, by reference to
tasks.serving.DDPMImageModel (or tasks.registry.DDPMImageModel), with the bounds in its state and
no model config: tasks.serving and tasks.registry re-export the class so they still unpickle.

Importing this file as a module (tasks.serving does, for that re-export) loads no weights: the
instance made at the end is empty until MLflow calls `load_context`, and `set_model` only
records it as the model for MLflow to pick up while it loads a code file.
"""

from __future__ import annotations

import base64
import io
import math
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from ddpm.checkpoint import CheckpointError, list_checkpoints, load_model
from ddpm.guidance import MAX_GUIDANCE_SCALE
from ddpm.images import to_uint8
from ddpm.samplers import SAMPLERS, SamplerConfig, generate

# what a request may ask for when it says nothing; declared in the signature so MLflow passes them
# (steps 0: the sampler's own default, ddpm.samplers.DEFAULT_STEPS; all T steps for ddpm)
# class -1: every class in turn (a class-conditional model); guidance -1: the default scale
DEFAULT_PARAMS = {"seed": 0, "sampler": SamplerConfig().sampler, "steps": 0, "eta": SamplerConfig().eta,
                  "format": "uint8", "class": -1, "guidance": -1.0}
FORMATS = ("uint8", "png_base64")
# the request bounds of a model whose model config does not set them
DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_STEPS = 1000
# A request this model would take longer to draw is refused up front (HTTP 400 with what fits):
# under the 60 s after which MLflow's scoring server answers 504 while the work goes on unseen.
DEFAULT_MAX_SECONDS = 50.0


def invalid(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 (INVALID_PARAMETER_VALUE)."""
    return MlflowException.invalid_parameter_value(message)


def png_base64(image_chw: np.ndarray) -> str:
    """One (C, H, W) uint8 image -> PNG bytes -> base64 text (what HTTP clients decode)."""
    array = image_chw[0] if image_chw.shape[0] == 1 else np.transpose(image_chw, (1, 2, 0))
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# MLflow warns, whenever this class is made (each import of this file, each load of a model), that
# `predict` has no type hints; its own `catch_warnings` + `simplefilter("once")` defeats warning
# filters. The model's schema is the signature logged with it, on purpose: the warning is dropped
# while the class is made.
_showwarning, warnings.showwarning = warnings.showwarning, lambda *args, **kwargs: None


class DDPMImageModel(PythonModel):
    """Images from a DDPM: input one row `num_images`; params seed, sampler, steps, eta, format,
    and for a class-conditional model class and guidance.

    Returns a uint8 array (N, C, H, W) for format "uint8", or a list of N base64 PNG strings for
    "png_base64". Requests are bounded: 1 <= num_images <= max_images, 0 <= steps <= min(T,
    max_steps), 0 <= eta <= 1, seed >= 0, class in the model's classes (-1: each in turn),
    0 <= guidance <= 20 (-1: the default scale); anything else, and a class or guidance asked of
    an unconditional model, is an HTTP 400 with the reason.

    `max_images` and `max_steps` come from the model config (keys of the same names); the class
    attributes are the defaults, and a legacy pickled instance carries its own in its state.
    """

    max_images: int = DEFAULT_MAX_IMAGES
    max_steps: int = DEFAULT_MAX_STEPS
    max_seconds: float = DEFAULT_MAX_SECONDS
    seconds_per_evaluation: float = 0.0   # one network evaluation of one image, timed at load

    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.max_images = int(config.get("max_images", self.max_images))
        self.max_steps = int(config.get("max_steps", self.max_steps))
        self.max_seconds = float(config.get("max_seconds", self.max_seconds))
        # the bundled folder holds exactly one checkpoint (see tasks.serving.write_ema_checkpoint)
        checkpoints = list_checkpoints(Path(context.artifacts["checkpoint"]))
        if len(checkpoints) != 1:
            raise CheckpointError(f"the model bundle {context.artifacts['checkpoint']} holds "
                                  f"{len(checkpoints)} checkpoints, expected one")
        self.model, self.diffusion_config, state = load_model(checkpoints[0], use_ema=False)
        self.step = int(state["step"])
        self.schedule = self.diffusion_config.make_schedule()
        self.seconds_per_evaluation = self._time_one_evaluation()

    def _time_one_evaluation(self, batch: int = 8) -> float:
        """Seconds per image per network evaluation here (a batch of noise, after a warm-up pass)."""
        import torch

        config = self.model.config
        x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
        t = torch.full((batch,), self.diffusion_config.num_timesteps // 2, dtype=torch.long)
        with torch.no_grad():
            self.model(x, t)
            start = time.perf_counter()
            self.model(x, t)
        return (time.perf_counter() - start) / batch

    def _check_duration(self, num_images: int, params: dict) -> None:
        """HTTP 400, before any work, for a request that would take longer than max_seconds here."""
        if not self.seconds_per_evaluation or not self.max_seconds:
            return
        sampling = SamplerConfig(sampler=params["sampler"], num_steps=int(params["steps"]) or None)
        steps = sampling.steps(self.diffusion_config.num_timesteps)
        per_image = steps * (2 if params["sampler"] == "heun" else 1)
        if self.model.config.num_classes is not None and params["guidance"] != 0:
            per_image *= 2   # guidance evaluates the conditional and the unconditional branch
        estimate = num_images * per_image * self.seconds_per_evaluation
        if estimate > self.max_seconds:
            fits = max(0, int(self.max_seconds / (per_image * self.seconds_per_evaluation)))
            # advice that can work: fewer images, else fewer steps, else no request fits at all
            steps_fit = int(self.max_seconds / (per_image / steps * self.seconds_per_evaluation))
            advice = (f"ask for at most {fits} images at these steps, or fewer steps" if fits else
                      f"one image at {steps} steps does not fit either: ask for at most {steps_fit} steps"
                      if steps_fit else "not even one step of one image fits: this model's max_seconds is too "
                                        "small for this machine")
            raise invalid(f"{num_images} images x {steps} {params['sampler']} steps would take about {estimate:.0f} s "
                          f"here, over this model's limit of {self.max_seconds:g} s: {advice}")

    def _request(self, model_input: Any, params: dict | None) -> tuple[int, dict]:
        """Validate the request: the image count and the sampling params, with a clear message."""
        if isinstance(model_input, dict):
            model_input = pd.DataFrame({k: v if isinstance(v, (list, tuple, np.ndarray)) else [v]
                                        for k, v in model_input.items()})
        if not isinstance(model_input, pd.DataFrame) or "num_images" not in model_input.columns:
            raise invalid("the input must be one record with an integer 'num_images', "
                          'e.g. {"dataframe_records": [{"num_images": 4}]}')
        if len(model_input) != 1:
            raise invalid(f"send exactly one record with 'num_images', got {len(model_input)}")
        num_images = model_input["num_images"].iloc[0]
        params = {**DEFAULT_PARAMS, **(params or {})}
        checks = {"num_images": num_images, "seed": params["seed"], "steps": params["steps"]}
        for name, value in checks.items():
            value = value.item() if isinstance(value, np.generic) else value   # 2.5, not np.float64(2.5)
            if isinstance(value, bool) or not isinstance(value, int):
                raise invalid(f"'{name}' must be an integer, got {value!r}")
        if not 1 <= num_images <= self.max_images:
            raise invalid(f"'num_images' must be between 1 and {self.max_images}, got {num_images}")
        max_steps = min(self.diffusion_config.num_timesteps, self.max_steps)
        if not 0 <= params["steps"] <= max_steps:
            raise invalid(f"'steps' must be between 1 and {max_steps} (or 0: the sampler's default), "
                          f"got {params['steps']}")
        if params["seed"] < 0:
            raise invalid(f"'seed' must be >= 0, got {params['seed']}")
        if params["sampler"] not in SAMPLERS:
            raise invalid(f"'sampler' must be one of {list(SAMPLERS)}, got {params['sampler']!r}")
        eta = params["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.number)) or not 0 <= eta <= 1:
            raise invalid(f"'eta' must be a number between 0 and 1, got {eta!r}")
        if params["format"] not in FORMATS:
            raise invalid(f"'format' must be one of {list(FORMATS)}, got {params['format']!r}")
        self._check_conditioning(params["class"], params["guidance"])
        self._check_duration(int(num_images), params)
        return int(num_images), params

    def _check_conditioning(self, class_label, guidance) -> None:
        num_classes = self.model.config.num_classes
        if isinstance(class_label, (bool, np.bool_)) or not isinstance(class_label, (int, np.integer)):
            raise invalid(f"'class' must be an integer, got {class_label!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or math.isnan(guidance):
            raise invalid(f"'guidance' must be a number, got {guidance!r}")
        if num_classes is None:
            if class_label != -1 or guidance != -1:
                raise invalid(f"'{'class' if class_label != -1 else 'guidance'}' needs a class-conditional model; "
                              "this one is unconditional")
            return
        if not -1 <= class_label < num_classes:
            raise invalid(f"'class' must be one of this model's classes 0..{num_classes - 1} (or -1: each in turn), "
                          f"got {class_label}")
        if guidance != -1 and not 0 <= guidance <= MAX_GUIDANCE_SCALE:
            raise invalid(f"'guidance' must be between 0 and {MAX_GUIDANCE_SCALE:g} (or -1: the default), "
                          f"got {guidance!r}")

    # --- drawing: one request (predict) or several compatible ones at once (the server's batches) ---

    def prepare(self, model_input: Any, params: dict | None) -> "Draw":
        """A validated request (HTTP 400 for anything out of bounds), ready to be drawn alone or
        in a batch with others of the same batch_key."""
        num_images, params = self._request(model_input, params)
        conditioning = {}
        if params["class"] != -1:
            conditioning["classes"] = (int(params["class"]),)
        if params["guidance"] != -1:
            conditioning["guidance_scale"] = float(params["guidance"])
        sampling = SamplerConfig(sampler=params["sampler"], num_steps=int(params["steps"]) or None,
                                 eta=float(params["eta"]), num_images=num_images, seed=int(params["seed"]),
                                 batch_size=num_images, **conditioning)
        labels = sampling.class_labels(self.model.config.num_classes)
        key = (sampling.sampler, sampling.steps(self.diffusion_config.num_timesteps), float(sampling.eta),
               None if labels is None else float(sampling.guidance()))
        return Draw(num_images, params["format"], sampling, labels, key)

    def draw(self, draws: list["Draw"], progress=None) -> list:
        """Draw several prepared requests of one batch_key in one batch: each gets exactly the
        images it would alone (image i of a request depends only on its seed and i), up to float
        rounding in the batched convolutions (at most one grey level). One result per request:
        its images, or the MlflowException that request answers (non-finite images).
        `progress` wraps the sampler's steps (ddpm.samplers.reverse_process): raising there stops
        the draw (the server's way to stop drawing for clients that went away)."""
        import torch

        from ddpm.guidance import ClassifierFreeGuidance
        from ddpm.samplers import image_generators, per_image_noise, reverse_process

        if len({d.key for d in draws}) != 1:
            raise ValueError("draw() takes requests of one batch_key")
        first = draws[0].sampling
        sampler = first.build(self.schedule, self.diffusion_config.prediction_type)
        config = self.model.config
        param = next(self.model.parameters())
        generators = [g for d in draws for g in image_generators(d.sampling.seed, range(d.num_images))]
        with torch.no_grad():
            x_T = per_image_noise(generators, (config.in_channels, config.image_size, config.image_size),
                                  param.device, param.dtype)
            network = self.model if draws[0].labels is None else ClassifierFreeGuidance(
                self.model, torch.cat([d.labels for d in draws]).to(param.device), first.guidance())
            drawn = reverse_process(network, sampler, x_T, generators, progress=progress).float().cpu()
        results, start = [], 0
        for d in draws:
            mine = drawn[start:start + d.num_images]
            start += d.num_images
            if not bool(mine.isfinite().all()):   # NaN weights would otherwise serve black squares
                bad = int((~mine.isfinite()).flatten(1).any(1).sum())
                results.append(MlflowException(
                    f"the model drew non-finite images ({bad} of {d.num_images} hold NaN or inf values): its "
                    f"weights are broken (step {self.step}), nothing to serve"))
                continue
            images = to_uint8(mine).numpy()
            results.append([png_base64(image) for image in images] if d.format == "png_base64" else images)
        return results

    def predict(self, context, model_input, params: dict | None = None):
        """Draw the images the request asks for (deterministic for a given seed). Images that are
        not finite (NaN weights) are an error (HTTP 500 when served), never black squares."""
        [result] = self.draw([self.prepare(model_input, params)])
        if isinstance(result, Exception):
            raise result
        return result


class Draw(NamedTuple):
    """One validated request: what draw() needs, and the key of the requests it can share a batch with."""

    num_images: int
    format: str
    sampling: SamplerConfig
    labels: Any          # a tensor of class labels, one per image (class-conditional models), or None
    key: tuple


warnings.showwarning = _showwarning

mlflow.models.set_model(DDPMImageModel())
