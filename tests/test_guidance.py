"""Class conditioning and classifier-free guidance: the UNet's class embedding, label dropout in
the trainer, guidance in every sampler, and the bad inputs that must be refused before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ddpm.data import BatchLoader, DataError, validate_for_model
from ddpm.diffusion import DiffusionConfig, predict_x0_and_epsilon
from ddpm.guidance import ClassifierFreeGuidance
from ddpm.images import to_uint8
from ddpm.samplers import SAMPLERS, SamplerConfig, generate
from ddpm.schedules import NoiseSchedule
from ddpm.checkpoint import load_model
from ddpm.training import Trainer, TrainConfig
from ddpm.unet import UNet, preset

CONDITIONAL = preset("tiny-16", base_channels=8, num_groups=4, num_classes=3)


def conditional_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(CONDITIONAL).eval()
    with torch.no_grad():   # a trained-looking embedding: the classes must change the output
        model.class_embedding.weight.normal_(0, 3)
    return model


def test_class_embedding_conditions_the_output_and_no_label_is_the_null_class():
    model = conditional_unet()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900])
    with torch.no_grad():
        outputs = [model(x, t, torch.full((3,), k)) for k in range(3)]
        null = model(x, t, torch.full((3,), model.null_class))
        unlabelled = model(x, t)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    assert torch.equal(unlabelled, null)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(preset("tiny-16", base_channels=8, num_groups=4))(x, t, torch.zeros(3, dtype=torch.long))


def test_unconditional_models_and_their_checkpoints_are_unchanged():
    """No class embedding, the same parameters as before; a checkpoint whose config predates
    num_classes loads as an unconditional model."""
    config = preset("tiny-16")
    assert config.num_classes is None and "class_embedding" not in str(UNet(config).state_dict().keys())
    old = {k: v for k, v in config.model_dump().items() if k != "num_classes"}
    assert type(config)(**old) == config
    conditional = UNet(preset("tiny-16", num_classes=10))
    extra = sum(p.numel() for p in conditional.parameters()) - sum(p.numel() for p in UNet(config).parameters())
    assert extra == 11 * 64   # (10 classes + null) x time_channels


@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_guidance_is_one_batched_pass_and_mixes_eps_as_the_formula_says(prediction_type):
    """eps = eps_uncond + w (eps_cond - eps_uncond), for any prediction type (the mix of raw outputs
    is exact: eps is affine in the output); w = 1 is the conditional model in one pass."""
    model = conditional_unet()
    schedule = NoiseSchedule.from_name("linear", 1000)
    x, t, labels = torch.randn(4, 1, 16, 16), torch.tensor([5, 200, 600, 999]), torch.tensor([0, 1, 2, 1])
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        cond, uncond = model(x, t, labels), model(x, t, torch.full((4,), 3))
        calls.clear()
        guided = ClassifierFreeGuidance(model, labels, 3.0)(x, t)
        assert calls == [8]
        calls.clear()
        assert torch.equal(ClassifierFreeGuidance(model, labels, 1.0)(x, t), cond) and calls == [4]
        assert torch.equal(ClassifierFreeGuidance(model, labels, 0.0)(x, t), uncond)

    def eps(output):
        return predict_x0_and_epsilon(schedule, x, t, output, prediction_type)[1]

    torch.testing.assert_close(eps(guided), eps(uncond) + 3.0 * (eps(cond) - eps(uncond)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_is_guided_and_image_i_depends_only_on_seed_index_and_class(sampler):
    model = conditional_unet()
    schedule = NoiseSchedule.from_name("cosine", 100)
    config = SamplerConfig(sampler=sampler, num_steps=4, num_images=5, guidance_scale=3.0)
    built = config.build(schedule)
    labels = config.class_labels(3)
    assert labels.tolist() == [0, 1, 2, 0, 1]   # every class in turn
    a = generate(model, built, 5, seed=1, batch_size=2, class_labels=labels, guidance_scale=3.0)
    b = generate(model, built, 5, seed=1, batch_size=5, class_labels=labels, guidance_scale=3.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)   # float noise of batch sizes, times w
    other = generate(model, built, 5, seed=1, batch_size=5, class_labels=torch.tensor([1, 1, 2, 0, 1]),
                     guidance_scale=3.0)
    assert not torch.allclose(other[0], a[0], atol=1e-2) and torch.allclose(other[1:], a[1:], atol=1e-3)


def test_classes_and_guidance_are_refused_for_an_unconditional_model_and_bounded():
    with pytest.raises(ValueError, match="unconditional"):
        SamplerConfig(classes=(3,)).class_labels(None)
    with pytest.raises(ValueError, match="unconditional"):
        SamplerConfig(guidance_scale=3).class_labels(None)
    assert SamplerConfig().class_labels(None) is None
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] outside this model's classes 0..2"):
        SamplerConfig(classes=(1, 3)).class_labels(3)
    assert SamplerConfig(classes=(2,), num_images=3).class_labels(3).tolist() == [2, 2, 2]
    for bad in ({"guidance_scale": -0.5}, {"guidance_scale": 21}, {"guidance_scale": float("nan")},
                {"classes": (-1,)}, {"classes": ()}):
        with pytest.raises(ValidationError):
            SamplerConfig(**bad)
    model = UNet(preset("tiny-16", base_channels=8, num_groups=4)).eval()
    sampler = SamplerConfig(num_steps=2).build(NoiseSchedule.from_name("cosine", 100))
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, sampler, 2, class_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("p_uncond", [-0.1, 1.0, 1.5, float("nan")])
def test_p_uncond_outside_zero_one_is_refused(p_uncond):
    with pytest.raises(ValidationError, match="p_uncond"):
        TrainConfig(p_uncond=p_uncond)


def test_data_without_labels_or_with_more_classes_is_refused_for_a_conditional_model():
    manifest = {"image_size": 16, "channels": 1, "has_labels": False, "source": "folder:/x", "class_names": None}
    validate_for_model(manifest, 16, 1)   # unconditional: fine
    with pytest.raises(DataError, match="needs labelled data"):
        validate_for_model(manifest, 16, 1, num_classes=10)
    labelled = {**manifest, "has_labels": True, "class_names": [str(i) for i in range(10)]}
    validate_for_model(labelled, 16, 1, num_classes=10)
    with pytest.raises(DataError, match="10 classes but the model was given num_classes=3"):
        validate_for_model(labelled, 16, 1, num_classes=3)


def labelled_loader(batch_size: int = 8, count: int = 40) -> BatchLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 1, 16, 16), dtype=torch.uint8, generator=generator)
    return BatchLoader(images, batch_size, seed=0, labels=torch.arange(count) % 3)


def test_labelled_batches_carry_the_labels_of_their_images():
    loader = labelled_loader()
    images, labels = loader.labelled_batch(7)
    assert torch.equal(images, loader.batch(7)) and torch.equal(labels, loader.indices(7) % 3)
    with pytest.raises(ValueError, match="no labels"):
        BatchLoader(loader.images, 8).labelled_batch(0)


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 8, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 2,
                          "device": "cpu", **overrides})


def test_label_dropout_replaces_p_uncond_of_the_labels_by_the_null_class():
    seen = []
    loader = labelled_loader(batch_size=64, count=200)
    trainer = Trainer(CONDITIONAL, DiffusionConfig(num_timesteps=100), train_config(steps=20, batch_size=64),
                      loader.labelled_batch)
    trainer.model.register_forward_hook(lambda module, args, output: seen.append(args[2].clone()))
    trainer.train(progress=False)
    labels = torch.cat(seen)
    dropped = (labels == CONDITIONAL.num_classes).float().mean().item()
    assert len(labels) == 1280 and 0.07 < dropped < 0.13   # p_uncond 0.1, binomial sd 0.008
    seen.clear()
    never = Trainer(CONDITIONAL, DiffusionConfig(num_timesteps=100), train_config(steps=2, batch_size=64, p_uncond=0.0),
                    loader.labelled_batch)
    never.model.register_forward_hook(lambda module, args, output: seen.append(args[2].clone()))
    never.train(progress=False)
    assert torch.equal(torch.cat(seen), torch.cat([loader.labelled_batch(k)[1] for k in range(2)]))


def test_conditional_training_resumes_bit_exactly_and_needs_labels(tmp_path):
    loader = labelled_loader()
    diffusion = DiffusionConfig(num_timesteps=100)
    straight = Trainer(CONDITIONAL, diffusion, train_config(), loader.labelled_batch, tmp_path / "a")
    straight.train(progress=False)
    first = Trainer(CONDITIONAL, diffusion, train_config(), loader.labelled_batch, tmp_path / "b")
    first.train(progress=False, stop_at=2)
    resumed = Trainer(CONDITIONAL, diffusion, train_config(), loader.labelled_batch, tmp_path / "b")
    assert resumed.train(progress=False).resumed_from == 2
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    model, _, _ = load_model(tmp_path / "b" / "step-0000004.pt")
    assert model.config.num_classes == 3
    with pytest.raises(ValueError, match="gave no labels"):
        Trainer(CONDITIONAL, diffusion, train_config(), loader.batch).train_step()


# --- promotion and the served model ---------------------------------------------------------


@pytest.mark.slow
def test_conditional_and_unconditional_models_never_compete_and_the_served_one_takes_class_and_guidance(
        mlflow_store, tmp_path):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.registry import champion_decision, promote_best
    from trained_runs import fake_trained_run, tiny_checkpoint

    store = MlflowClient(mlflow_store)
    unconditional = tiny_checkpoint(tmp_path / "u")
    conditional = tiny_checkpoint(tmp_path / "c", num_classes=3)
    champion = fake_trained_run(store, "ddpm", unconditional, 5.0)   # a run from before the tag: unconditional
    assert promote_best("ddpm", "ddpm")["run_id"] == champion
    better = fake_trained_run(store, "ddpm", conditional, 1.0, conditional=True)

    # the newest run is conditional, so are the candidates; into "ddpm" it would not replace the champion
    kept = promote_best("ddpm", "ddpm")
    assert kept["run_id"] == better and kept["conditional"] and not kept["moved"]
    assert "another kind of model" in kept["reason"]
    assert store.get_model_version_by_alias("ddpm", "champion").run_id == champion
    assert promote_best("ddpm", "ddpm", conditional=False)["run_id"] == champion
    own = promote_best("ddpm", "ddpm-conditional", conditional=True)
    assert own["moved"] and own["run_id"] == better
    assert champion_decision({"fid.metric": "m", "dataset.fingerprint": "d", "fid.num_samples": "5",
                              "model.conditional": "true", "fid": "1"},
                             {"fid.metric": "m", "dataset.fingerprint": "d", "fid.num_samples": "5", "fid": "9"})[0] \
        is False

    served = mlflow.pyfunc.load_model("models:/ddpm-conditional@champion")
    params = {"sampler": "ddim", "steps": 4, "seed": 3, "class": 2, "guidance": 3.0}
    images = served.predict({"num_images": 2}, params=params)
    model, diffusion, _ = load_model(conditional)
    sampling = SamplerConfig(sampler="ddim", num_steps=4, seed=3, num_images=2, classes=(2,), guidance_scale=3.0)
    expected = to_uint8(generate(model, sampling.build(diffusion.make_schedule()), 2, seed=3,
                                 class_labels=sampling.class_labels(3), guidance_scale=3.0))
    assert np.array_equal(images, expected.numpy())
    for bad, message in [({"class": 3}, "classes 0..2"), ({"class": -2}, "classes 0..2"),
                         ({"guidance": 25.0}, "'guidance' must be between 0 and 20")]:
        with pytest.raises(MlflowException, match=message):
            served.predict({"num_images": 1}, params={**params, **bad})
    plain = mlflow.pyfunc.load_model("models:/ddpm@champion")
    for bad in ({"class": 1}, {"guidance": 2.0}):
        with pytest.raises(MlflowException, match="needs a class-conditional model"):
            plain.predict({"num_images": 1}, params=bad)


# --- the pipeline ---------------------------------------------------------------------------


PIPELINE_TRAIN = TrainConfig(steps=12, batch_size=16, warmup_steps=2, log_every=4, checkpoint_every=12,
                             ema_decay=0.99, learning_rate=1e-3)
PIPELINE_SAMPLING = SamplerConfig(sampler="ddim", num_steps=4, num_images=20, batch_size=20)


@pytest.mark.slow
def test_a_conditional_pipeline_run_measures_accuracy_and_the_guidance_sweep(prefect_harness, mlflow_store):
    from mlflow.tracking import MlflowClient

    from flows.train_pipeline import train_pipeline
    from ddpm.data import DataConfig

    model = preset("tiny-16", base_channels=8, num_groups=4, num_classes=10)
    summary = train_pipeline(data=DataConfig(source="digits", max_images=200), model=model, train=PIPELINE_TRAIN,
                             sampling=PIPELINE_SAMPLING, fid_extractor="classifier", experiment="guided")
    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["model.conditional"] == "true" and summary["conditional"]
    assert run.data.params["model.num_classes"] == "10" and run.data.params["train.p_uncond"] == "0.1"
    samples = np.load(summary["samples"]["npz"])
    assert samples["labels"].tolist() == [i % 10 for i in range(20)] and float(samples["guidance_scale"]) == 1.5

    evaluation = summary["evaluation"]
    assert 0 <= evaluation["conditional_accuracy"] <= 1
    assert run.data.metrics["conditional_accuracy"] == pytest.approx(evaluation["conditional_accuracy"])
    assert set(evaluation["fid_classifier_per_class"]) == {str(k) for k in range(10)}
    assert run.data.metrics["fid_classifier_class_mean"] == pytest.approx(
        np.mean(list(evaluation["fid_classifier_per_class"].values())))

    sweep = evaluation["guidance_sweep"]
    assert [row["guidance_scale"] for row in sweep["rows"]] == [0.0, 1.0, 1.5, 2.0, 3.0, 5.0]
    assert all(0 <= row["conditional_accuracy"] <= 1 and row["fid_classifier"] > 0 for row in sweep["rows"])
    assert run.data.tags["guidance.best_scale"] == f"{sweep['best_scale']:g}"
    table = json.loads(Path(client.download_artifacts(summary["run_id"], "evaluation/guidance_sweep.json")).read_text())
    assert table["columns"][0] == "guidance_scale" and len(table["data"]) == 6
    assert "plots/guidance_sweep.png" in {a.path for a in client.list_artifacts(summary["run_id"], "plots")}


@pytest.mark.slow
def test_a_conditional_model_on_unlabelled_data_is_refused_before_any_run(prefect_harness, mlflow_store, tmp_path):
    import mlflow
    from PIL import Image
    from sklearn.datasets import load_digits

    from ddpm.data import DataConfig
    from flows.train_pipeline import train_pipeline

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, image in enumerate(load_digits().images[:120]):
        Image.fromarray((image * 255 / 16).astype("uint8")).save(folder / f"{i:03d}.png")
    state = train_pipeline(data=DataConfig(source=f"folder:{folder}"), model=CONDITIONAL.model_copy(
                               update={"num_classes": 10}), train=PIPELINE_TRAIN, sampling=PIPELINE_SAMPLING,
                           experiment="refused", return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="needs labelled data"):
        state.result()
    assert mlflow.search_runs(experiment_names=["refused"], output_format="list") == []
