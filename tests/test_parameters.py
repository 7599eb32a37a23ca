"""Flow parameters as deployments, the UI and the CLI give them: a partial section changes only the
fields it names. Prefect validates the JSON of a deployment run against the flow's signature; that
validation is what these tests call (no server needed)."""

from ddpm.data import DataConfig
from ddpm.training import TrainConfig
from flows.compare_schedules import compare_schedules
from flows.retrain import overlay, retrain
from flows.train_pipeline import DEFAULT_DIFFUSION, DEFAULT_MODEL, DEFAULT_SAMPLING, DEFAULT_TRAIN, train_pipeline

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
