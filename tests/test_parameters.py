"""Flow parameters as deployments, the UI and the CLI give them: a partial section changes only the
fields it names. Prefect validates the JSON of a deployment run against the flow's signature; that
validation is what these tests call (no server needed)."""

from ddpm.data import DataConfig
from ddpm.training import TrainConfig
from flows.compare_schedules import compare_schedules
from flows.retrain import retrain
from flows.train_pipeline import train_pipeline
from tasks.config import DEFAULTS, overlay

DEFAULT_DIFFUSION, DEFAULT_MODEL, DEFAULT_SAMPLING, DEFAULT_TRAIN = (
    DEFAULTS.diffusion, DEFAULTS.model, DEFAULTS.sampling, DEFAULTS.train)

PARTIAL = {"data": {"max_images": 100}, "model": {"dropout": 0.2}, "train": {"steps": 3000},
           "sampling": {"num_steps": 20}}


def test_a_partial_section_keeps_the_pipelines_defaults_not_the_classes():
    """`--param train='{"steps": 3000}'` once gave batch 128, lr 2e-4 and 5000 warm-up steps (the
    paper's TrainConfig defaults) instead of the tuned recipe with 3000 steps."""
    for flow in (train_pipeline, compare_schedules):
        params = flow.validate_parameters(PARTIAL)
        assert params["train"] == DEFAULT_TRAIN.model_copy(update={"steps": 3000})
        assert params["train"].learning_rate == 4e-3 and params["train"].batch_size == 64
        assert params["model"] == DEFAULT_MODEL.model_copy(update={"dropout": 0.2})
        assert params["sampling"] == DEFAULT_SAMPLING.model_copy(update={"num_steps": 20})
        assert params["data"] == DataConfig(max_images=100)
    diffusion = train_pipeline.validate_parameters({"diffusion": {"num_timesteps": 500}})["diffusion"]
    assert diffusion == DEFAULT_DIFFUSION.model_copy(update={"num_timesteps": 500}) and diffusion.schedule == "cosine"


def test_objects_and_complete_sections_pass_unchanged():
    explicit = TrainConfig(steps=7)   # built in Python: the caller chose every field
    assert train_pipeline.validate_parameters({"train": explicit})["train"] == explicit
    full = {**DEFAULT_TRAIN.model_dump(), "learning_rate": 1e-3}
    assert train_pipeline.validate_parameters({"train": full})["train"] == TrainConfig(**full)


def test_retrain_changes_only_the_named_fields_of_the_best_runs_settings():
    best = DEFAULT_TRAIN.model_copy(update={"learning_rate": 1e-3, "ema_decay": 0.995})
    given = retrain.validate_parameters({"train": {"steps": 3000}})["train"]
    assert overlay(best, given) == best.model_copy(update={"steps": 3000})
    assert overlay(best, None) is best


def test_the_flows_parameters_are_the_pipeline_configs_sections_with_its_defaults():
    import inspect

    from tasks.config import PipelineConfig

    parameters = inspect.signature(train_pipeline.fn).parameters
    for name in PipelineConfig.model_fields:
        assert parameters[name].default == getattr(DEFAULTS, name), name
    assert DEFAULTS == PipelineConfig.model_validate({})   # one home of the defaults
    assert DEFAULTS.train != TrainConfig()   # the pipeline's recipe, not the paper's


def test_settings_by_dotted_key_and_unknown_ones_named():
    import pytest

    config = DEFAULTS.with_settings({"train.steps": 7, "model.dropout": 0.1, "fid_extractor": "classifier"})
    assert config == DEFAULTS.model_copy(update={"train": DEFAULT_TRAIN.model_copy(update={"steps": 7}),
                                                 "model": DEFAULT_MODEL.model_copy(update={"dropout": 0.1}),
                                                 "fid_extractor": "classifier"})
    assert DEFAULTS.differences(config) == ["model.dropout 0.0 -> 0.1", "train.steps 1500 -> 7",
                                            "fid_extractor 'auto' -> 'classifier'"]
    with pytest.raises(ValueError, match="train has no setting 'learning_rat' \\(did you mean learning_rate"):
        DEFAULTS.with_settings({"train.learning_rat": 1})
    with pytest.raises(ValueError, match="train has no setting 'lr'; it has \\['batch_size', "):
        DEFAULTS.with_settings({"train.lr": 1})
    with pytest.raises(ValueError, match="unknown section 'optimizer'"):
        DEFAULTS.with_settings({"optimizer.lr": 1})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        DEFAULTS.with_settings({"train.steps": 0})


def test_a_stored_config_of_an_older_run_loads_as_it_ran():
    """config.json of a run started before min_snr_gamma, p_uncond, fid_extractor or rank_by existed: a
    missing field takes the class's default (the behaviour that run had: no Min-SNR weighting),
    not the pipeline's current default (Min-SNR-5)."""
    import pytest

    from tasks.config import PipelineConfig

    current = DEFAULTS.to_stored()
    old = {section: dict(values) for section, values in current.items() if section not in ("fid_extractor", "rank_by")}
    del old["diffusion"]["min_snr_gamma"], old["train"]["p_uncond"], old["train"]["progress_images"]
    loaded = PipelineConfig.from_stored(old)
    assert loaded.diffusion.min_snr_gamma is None and DEFAULTS.diffusion.min_snr_gamma == 5.0
    assert loaded.train == DEFAULT_TRAIN and loaded.fid_extractor == "auto" and loaded.rank_by == "fid"
    assert PipelineConfig.from_stored(current) == DEFAULTS   # a round trip
    with pytest.raises(ValueError, match="cannot read .*train.optimizer: Extra inputs are not permitted"):
        PipelineConfig.from_stored({**current, "train": {**current["train"], "optimizer": "lamb"}})
    with pytest.raises(ValueError, match="sections \\['scheduler'\\] are not settings"):
        PipelineConfig.from_stored({**current, "scheduler": {}})


def test_evaluate_applies_a_partial_sampling_over_the_evaluated_runs_own():
    """`{"sampler": "ddim"}` once fell back to SamplerConfig's 64 images instead of the run's count."""
    from flows.evaluate import evaluate

    given = evaluate.validate_parameters({"mlflow_run_id": "x", "sampling": {"sampler": "ddim"}})["sampling"]
    stored = DEFAULT_SAMPLING.model_copy(update={"num_images": 1000, "batch_size": 250})
    assert overlay(stored, given) == stored.model_copy(update={"sampler": "ddim"})
    assert evaluate.validate_parameters({"mlflow_run_id": "x"})["sampling"] is None


def test_a_folder_source_takes_the_content_split_unless_one_is_chosen():
    """A folder grows, so its default split is by content; a recipe's chosen split stays."""
    from tasks.config import PipelineConfig, recipe

    assert DEFAULTS.data.split == "random"   # the digits: as before
    assert DEFAULTS.with_settings({"data.source": "folder:/x"}).data.split == "content"
    assert train_pipeline.validate_parameters({"data": {"source": "folder:/x"}})["data"].split == "content"
    assert PipelineConfig.model_validate({"data": {"source": "folder:/x", "split": "random"}}).data.split == "random"
    assert recipe("mnist").with_settings({"data.source": "mnist:/m"}).data.split == "official"
