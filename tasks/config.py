"""PipelineConfig: every setting of one pipeline run, in one typed object.

    PipelineConfig()                                   the pipeline's defaults (digits, tiny-16, the tuned recipe)
    PipelineConfig.model_validate({"train": {"steps": 3000}})   the defaults with 3000 steps
    recipe("mnist").with_settings({"train.steps": 500})         a named recipe, one field changed
    PipelineConfig.from_stored(json.loads(config_json))          a run's config.json, also an older one

The five sections are ddpm's own config classes, whose defaults stay the paper's; PipelineConfig's
defaults are the pipeline's (the small-model recipe tuned by measurement, docs/benchmarks.md), the
one place they are written. The flows take the sections as their parameters (Prefect's schema of
their deployments), store the whole object as the run's config.json, and `retrain`, `evaluate`
and `--resume` read it back with `from_stored`. The CLI's options and `--set` keys are its
settings (`settings()`).

One rule for a partial section, in every flow: a section given partially (a deployment's
`--param train='{"steps": 3000}'`, the Prefect UI form, `--set train.steps=3000`, a recipe)
changes only the fields it names over the configuration the flow starts from, never over the
class's defaults (the paper's):
    train_pipeline, compare_schedules   a new run: over the pipeline's defaults (`DataParam`, ...)
    retrain                             over the best run's stored configuration (`overlay`)
    evaluate                            over the evaluated run's stored configuration (`overlay`)
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ddpm.data import DataConfig
from ddpm.errors import one_line  # noqa: F401 (the tasks' import of it)
from ddpm.data.prepare import default_split
from ddpm.diffusion import DiffusionConfig
from ddpm.metrics.measures import MEASURES
from ddpm.metrics.scoring import ExtractorKind   # "auto": every FID the data allows
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig
from ddpm.unet import UNetConfig, preset

# the measure a run ranks by: its primary metric (tag fid.metric), e.g. kid -> kid_inception
MeasureName = Literal[tuple(MEASURES)]


def merged(section: str, base: dict, changes: dict) -> dict:
    """`base` (a section's values) with `changes` applied. DataConfig.split's default follows the
    source ("content" for a folder, which grows; "random" for the fixed sets): a new source without
    a split takes its own default, unless the base had chosen another split than its source's
    default (a recipe's "official")."""
    values = {**base, **changes}
    if section == "data" and "source" in changes and "split" not in changes and base.get("split") == \
            default_split(base.get("source", "digits")):
        values.pop("split", None)
    return values


def partial_over(base: BaseModel, section: str) -> BeforeValidator:
    """Field metadata: a JSON object given for the section changes only the fields it names; the
    others keep `base`'s values (the pipeline's defaults), not the class's own (the paper's).
    Objects pass as they are: a caller who built one chose every field."""
    def merge(value):
        return merged(section, base.model_dump(), value) if isinstance(value, dict) else value
    return BeforeValidator(merge)


# Defaults sized for a laptop CPU: a few minutes end to end on 2 cores. At this size the cosine
# noise schedule, a learning rate 20x the paper's with a cosine decay to 0, and Min-SNR-5 loss
# weighting roughly halve the FID of the paper's recipe in the same minutes (docs/benchmarks.md,
# "Recipe sweep", two training seeds).
_MODEL = preset("tiny-16")
_DIFFUSION = DiffusionConfig(schedule="cosine", min_snr_gamma=5.0)
_TRAIN = TrainConfig(steps=1500, batch_size=64, learning_rate=4e-3, warmup_steps=100, lr_schedule="cosine",
                     ema_decay=0.999, log_every=25, checkpoint_every=500, keep_last=3)
# 350 samples: FID needs a reference (the holdout split) at least as large; the digits hold out 359.
# The sampler is SamplerConfig's default (DPM-Solver++ 2M SDE, 20 steps).
_SAMPLING = SamplerConfig(num_images=350, batch_size=175)

# The flows' section parameters: `--param train='{"steps": 3000}'` is the tuned recipe with 3000
# steps, not TrainConfig(steps=3000) with the paper's batch and learning rate.
DataParam = Annotated[DataConfig, partial_over(DataConfig(), "data")]
ModelParam = Annotated[UNetConfig, partial_over(_MODEL, "model")]
DiffusionParam = Annotated[DiffusionConfig, partial_over(_DIFFUSION, "diffusion")]
TrainParam = Annotated[TrainConfig, partial_over(_TRAIN, "train")]
SamplingParam = Annotated[SamplerConfig, partial_over(_SAMPLING, "sampling")]


class PipelineConfig(BaseModel):
    """Data, model, diffusion, training, sampling, the FID extractor and the ranking measure of one
    pipeline run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataParam = DataConfig()
    model: ModelParam = _MODEL
    diffusion: DiffusionParam = _DIFFUSION
    train: TrainParam = _TRAIN
    sampling: SamplingParam = _SAMPLING
    fid_extractor: ExtractorKind = "auto"
    rank_by: MeasureName = Field("fid", description="the measure the run ranks by (its primary metric, tag "
                                                    "fid.metric: what promotion, retrain and compare compare): fid, "
                                                    "or kid (unbiased at few samples), precision, recall")

    @classmethod
    def sections(cls) -> dict[str, type[BaseModel]]:
        """{"data": DataConfig, ...}: the fields that are config objects, by name."""
        return {name: field.annotation for name, field in cls.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """Every setting by its dotted key ("train.steps") with its pipeline default: the CLI's --set keys."""
        defaults = cls()
        keys: dict[str, Any] = {}
        for name in cls.model_fields:
            value = getattr(defaults, name)
            if isinstance(value, BaseModel):
                keys.update({f"{name}.{field}": getattr(value, field) for field in type(value).model_fields})
            else:
                keys[name] = value
        return keys

    def with_settings(self, settings: dict[str, Any]) -> PipelineConfig:
        """A copy with dotted settings applied ({"train.steps": 3000, "fid_extractor": "inception"})
        and validated; an unknown key is a ValueError naming the nearest known ones."""
        known = self.settings()
        for key in settings:
            if key not in known:
                raise ValueError(unknown_setting(key, known))
        values, changes = self.model_dump(), {}
        for key, value in settings.items():
            section, _, field = key.partition(".")
            if field:
                changes.setdefault(section, {})[field] = value
            else:
                values[section] = value
        for section, fields in changes.items():
            values[section] = merged(section, values[section], fields)
        return type(self).model_validate(values)

    @classmethod
    def from_stored(cls, stored: dict) -> PipelineConfig:
        """The configuration a run stored as config.json, as it was: a field added to a section
        since the run started takes the class's default (the behaviour the run had, e.g. no
        Min-SNR weighting), not the pipeline's current one; a section or field the run stored
        that no longer exists is a ValueError naming it."""
        problem, values = None, dict(stored)
        unknown = sorted(set(stored) - set(cls.model_fields))
        if unknown:
            problem = f"sections {unknown} are not settings of this version"
        for name, section in cls.sections().items():
            if name in stored and problem is None:
                try:
                    values[name] = section.model_validate(stored[name])
                except ValidationError as error:
                    problem = one_line(error, prefix=f"{name}.")
        try:
            if problem is None:
                return cls(**values)
        except ValidationError as error:
            problem = one_line(error)
        raise ValueError(f"a stored configuration that this version cannot read (written by another version of "
                         f"ddpm-pipeline?): {problem}")

    def to_stored(self) -> dict:
        """The JSON form that runs store as config.json."""
        return self.model_dump(mode="json")

    def differences(self, other: PipelineConfig) -> list[str]:
        """'train.learning_rate 0.004 -> 0.001' for each setting that `other` changes."""
        mine, theirs = flat(self.to_stored()), flat(other.to_stored())
        return [f"{key} {mine[key]!r} -> {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]


M = TypeVar("M", bound=BaseModel)


def overlay(base: M, changes: M | None) -> M:
    """`base` with the fields that `changes` names (a section given as `{"steps": 3000}` names
    one: its `model_fields_set`); None changes nothing. How a partial section applies to a stored
    run's configuration (retrain, evaluate)."""
    if changes is None:
        return base
    section = next((name for name, kind in PipelineConfig.sections().items() if isinstance(base, kind)), "")
    return type(base).model_validate(merged(section, base.model_dump(),
                                            changes.model_dump(include=changes.model_fields_set)))


def unknown_setting(key: str, known: dict[str, Any]) -> str:
    """Why `key` is not a setting, with the nearest known ones."""
    section, _, field = key.partition(".")
    fields = [k.partition(".")[2] for k in known if k.startswith(f"{section}.")]
    if not fields:
        sections = sorted({k.partition(".")[0] for k in known if "." in k})
        return f"unknown section '{section}' in {key!r}; the sections are {sections} (--show-config lists every setting)"
    close = difflib.get_close_matches(field, fields, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else f"; it has {sorted(fields)}"
    return f"{section} has no setting '{field}'{hint}"


def flat(values: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and not prefix:
            out.update(flat(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


# Named recipes: what differs from the defaults for one kind of run (`ddpm train --recipe NAME`;
# prefect.yaml's train-<NAME> deployments carry the same values, tests/test_deployments.py checks).
RECIPES: dict[str, dict] = {
    "digits": {},   # the defaults: scikit-learn's 8x8 digits at 16x16, a few minutes on a laptop
    # MNIST at full size, the standard split: train on the 60,000, FID against the 10,000 test
    # images. 28x28 is padded to 32x32 (every pixel kept, no resampling blur; 32 halves twice
    # for the UNet's levels). ~15 min of training on 2 CPU cores (docs/benchmarks.md).
    "mnist": {
        "data": {"source": "mnist", "image_size": 32, "resize": "pad", "split": "official"},
        "model": {"image_size": 32, "channel_mults": [1, 2, 2]},   # the tiny-32 preset
        "train": {"steps": 2000},
        "sampling": {"num_images": 1000, "batch_size": 250},
    },
    # The defaults, class-conditional: one model for the ten digits, sampled with classifier-free
    # guidance; the run adds conditional accuracy and the guidance sweep (docs/benchmarks.md).
    "digits-conditional": {"model": {"num_classes": 10}},
}


def recipe(name: str) -> PipelineConfig:
    """The configuration of recipe `name` (RECIPES): the defaults with the recipe's changes."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    return PipelineConfig.model_validate(RECIPES[name])


DEFAULTS = PipelineConfig()
