"""`jobs.reproduce` reuses a stage's outputs only for the settings they were made with.

A complete data set, a finished or resumable fine-tune, a complete samples folder and a metrics.json are
found on storage (written here as the stages write them, without running them); a rerun with a setting
that decides them changed is refused with the change named (data, fine-tune, samples: expensive, never
silently replaced), metrics are computed again (also for samples made again with the same settings). The preflight says so before stage 1, and refuses comparisons it can see will fail
late: a reference that is a folder of latents, eval.samples, a method that does not fit the config.
"""

from __future__ import annotations

import numpy as np
import pytest

from dydit_dist import config, pipeline, preflight, run_config, storage
from dydit_dist.eval.evaluate import evaluation_settings
from dydit_dist.paths import RunPaths
from dydit_dist.sample import SamplesError, SamplesManifest, run_sampling, sampling_settings
from dydit_dist.sample.plan import plan_shards
from dydit_dist.sample.pool import sampling_config
from dydit_dist.shardset import settings_digest, write_marker


def load(tmp_path, *overrides):
    return config.load("debug", [f"storage.root=file://{tmp_path}", "storage.run=r", f"data.uri=file://{tmp_path}/data/r",
                                 "eval.metrics=[isc]",
                                 "eval.methods=[static,dydit]", "model.dynamic.target_lambda=0.5", *overrides])


def finish_finetune(cfg, static: str | None = None) -> str:
    """The DyDiT fine-tune of `cfg` (from `static`) as train_stage leaves it: its config, an EMA export at max_steps."""
    finetune = pipeline.finetune_config(cfg, static, "dydit")
    run_config.save(finetune, "finetune")
    step = finetune.train.max_steps
    url = storage.join(RunPaths(finetune).checkpoints, f"ema-{step:07d}.safetensors")
    storage.write_bytes(url, b"weights")
    storage.write_json(RunPaths(finetune).ema_pointer, {"step": step, "file": url.rsplit("/", 1)[-1], "url": url})
    committed = {"checkpoint_dir_name": f"step-{step:07d}", "metrics": {}}  # Ray Train's snapshot of that commit
    storage.write_json(storage.join(RunPaths(finetune).checkpoints, "checkpoint_manager_snapshot.json"),
                       {"checkpoint_results": [committed], "latest_checkpoint_result": committed})
    return RunPaths(finetune).url


def finish_samples(m_cfg) -> SamplesManifest:
    """A complete samples folder of `m_cfg`, as the sample job records it."""
    s = m_cfg.sample
    units = plan_shards(s.num_samples, s.shard_size)
    manifest = SamplesManifest(sampling_settings(sampling_config(m_cfg)), len(units))
    for u in units:
        name = f"shard-{u.index:06d}.tar"
        storage.write_bytes(storage.join(RunPaths(m_cfg).samples, name), b"x")
        manifest.add({"index": u.index, "name": name, "count": u.count, "bytes": 1, "sha256": "0" * 64})
    manifest.write(RunPaths(m_cfg).samples)
    return manifest


def problems(cfg) -> dict[str, str]:
    """{key: its problems, one per line} of the reproduce plan of `cfg`."""
    found: dict[str, str] = {}
    for i in preflight.plan(cfg, "reproduce").problems:
        found[i.key] = f"{found[i.key]}\n{i.problem}" if i.key in found else i.problem
    return found


def test_a_finished_fine_tune_is_reused_only_with_its_settings(tmp_path):
    cfg = load(tmp_path)
    run = finish_finetune(cfg)
    assert pipeline.finetune_done(pipeline.finetune_config(cfg, None, "dydit"))
    # where and how it ran does not decide the weights
    same = load(tmp_path, "train.log_every=7", "train.checkpoint_every=5", "deepspeed.zero_stage=3",
                "train.micro_batch_size=2", "model.flexdit.ramp_start=0.5")  # nor FlexDiT's options, on a DyDiT
    assert pipeline.finetune_done(pipeline.finetune_config(same, None, "dydit"))
    assert "finished training" not in problems(same).get("storage.run", "")
    # what decides them does: the target, fewer steps, the learning rate
    for override, change in (("model.dynamic.target_lambda=0.7", "model.dynamic.target_lambda: 0.5 -> 0.7"),
                             ("train.max_steps=10", "train.max_steps: 20 -> 10"),
                             ("train.lr=0.001", "train.lr: 0.0001 -> 0.001")):
        other = load(tmp_path, override)
        with pytest.raises(pipeline.OutputsDiffer, match=f"{run} finished training with other settings") as err:
            pipeline.finetune_done(pipeline.finetune_config(other, None, "dydit"))
        assert change in str(err.value)
        assert change in problems(other)["storage.run"]
    # more steps: the run goes on from its checkpoint (the launcher's own resume checks apply)
    assert not pipeline.finetune_done(pipeline.finetune_config(load(tmp_path, "train.max_steps=40"), None, "dydit"))


def test_a_fine_tune_of_static_weights_a_stage_makes_again_is_refused(tmp_path):
    """The demo's pretrain run goes on (more steps): the finished fine-tune started from its earlier weights,
    so the report would compare new static weights with a fine-tune of the old ones."""
    cfg = load(tmp_path, "eval.pretrain_config=reproduce_debug_pretrain")
    run = finish_finetune(cfg, RunPaths(pipeline.pretrain_config(cfg)).url)  # the pretrain run: no export yet
    assert problems(cfg)["storage.run"].startswith(
        "holds a finetune of earlier model.checkpoint weights, and the pretrain stage makes new ones")
    assert run.endswith("/runs/r/finetune")


@pytest.mark.parametrize("flip", ["true", "false"])
def test_the_pretrain_run_trains_with_the_flip_the_data_are_prepared_with(tmp_path, flip):
    """The data are prepared with this job's data.flip and a fine-tune refuses data of another flip
    (`verify_manifest`): the pretrain config (its own file) takes this job's, as it takes its data.uri."""
    cfg = load(tmp_path, "eval.pretrain_config=reproduce_debug_pretrain", f"data.flip={flip}")
    pretrain = pipeline.pretrain_config(cfg)
    assert (pretrain.data.uri, pretrain.data.flip) == (cfg.data.uri, flip == "true")
    assert pipeline.finetune_config(cfg, None, "dydit").data.flip is (flip == "true")


def test_samples_are_reused_only_with_their_settings(tmp_path):
    cfg = load(tmp_path)
    trained = {"dydit": finish_finetune(cfg)}
    m_cfg = pipeline.method_config(cfg, "dydit", None, trained)
    finish_samples(m_cfg)
    assert pipeline.samples_done(m_cfg)
    assert [s.work for s in preflight.plan(cfg, "reproduce").stages if s.name == "sample dydit"] == [
        "outputs exist, skipped"]
    other = load(tmp_path, "sample.steps=20")
    with pytest.raises(SamplesError, match=r"steps: 10 there vs 20 now"):
        pipeline.samples_done(pipeline.method_config(other, "dydit", None, trained))
    assert "already holds shards prepared with other settings" in problems(other)["storage.run"]


def test_samples_with_a_shard_gone_are_not_done(tmp_path):
    """A recorded shard whose object is missing or of another size: the sample stage runs again and makes it
    (before, the stage was skipped and every evaluation failed on the missing shard)."""
    cfg = load(tmp_path)
    m_cfg = pipeline.method_config(cfg, "static", None, {})
    finish_samples(m_cfg)
    assert pipeline.samples_done(m_cfg)
    storage.remove(storage.join(RunPaths(m_cfg).samples, "shard-000001.tar"))
    assert not pipeline.samples_done(m_cfg)
    storage.write_bytes(storage.join(RunPaths(m_cfg).samples, "shard-000001.tar"), b"xy")  # truncated / replaced
    assert not pipeline.samples_done(m_cfg)


def test_samples_whose_manifest_lags_their_markers_are_not_done_until_written(tmp_path):
    """A sampling driver that died after the last done-marker, before its last manifest write: the folder is
    not done (the evaluation reads the manifest, and would fail on it at every rerun) until the sample job,
    which makes nothing then, writes the manifest from the markers."""
    cfg = load(tmp_path)
    m_cfg = pipeline.method_config(cfg, "static", None, {})
    done = finish_samples(m_cfg)
    url = RunPaths(m_cfg).samples
    for record in done.records():
        write_marker(url, {**record, "settings_sha256": settings_digest(done.settings)})
    SamplesManifest(done.settings, done.num_shards).write(url)  # as written when the actors were ready
    assert not pipeline.samples_done(m_cfg)
    assert run_sampling(m_cfg).complete  # no Ray: nothing to make
    assert SamplesManifest.read(url).complete and pipeline.samples_done(m_cfg)


def test_samples_of_weights_a_stage_replaces_are_refused_before_it_trains(tmp_path):
    cfg = load(tmp_path)
    trained = {"dydit": finish_finetune(cfg)}
    finish_samples(pipeline.method_config(cfg, "dydit", None, trained))
    more = load(tmp_path, "train.max_steps=40")  # the fine-tune goes on: new weights, the old samples stay
    refused = ("holds samples of earlier weights, and the finetune stage makes new ones; use another storage.run, "
               "or remove that folder")
    assert problems(more)["storage.run"] == refused
    # samples only in done-markers (the sampling driver died before recording any in the manifest)
    url = RunPaths(pipeline.method_config(cfg, "dydit", None, trained)).samples
    done = SamplesManifest.read(url)
    write_marker(url, {**done.records()[0], "settings_sha256": settings_digest(done.settings)})
    SamplesManifest(done.settings, done.num_shards).write(url)
    assert problems(more)["storage.run"] == refused


def test_metrics_are_computed_again_for_other_samples_or_settings(tmp_path):
    cfg = load(tmp_path)
    m_cfg = pipeline.method_config(cfg, "static", None, {})
    manifest = finish_samples(m_cfg)
    record = {"metrics": {"isc_mean": 1.0}, "num_samples": manifest.num_samples, "sampling": manifest.settings,
              "samples_digest": manifest.content_digest(), "evaluation": evaluation_settings(m_cfg.eval)}
    storage.write_json(RunPaths(m_cfg).metrics, record)
    assert pipeline.metrics_done(m_cfg)
    assert not pipeline.metrics_done(pipeline.method_config(load(tmp_path, "eval.isc_splits=5"), "static", None, {}))
    # options of metrics not computed, and a reference the metrics do not read (IS alone), are no change
    assert pipeline.metrics_done(pipeline.method_config(load(tmp_path, "eval.prc_neighborhood=7"), "static", None, {}))
    elsewhere = load(tmp_path, f"eval.reference={tmp_path}/other.npz")
    assert pipeline.metrics_done(pipeline.method_config(elsewhere, "static", None, {}))
    # for FID the reference is a change, by URL and by content; the same content reads the same
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    fid = load(tmp_path, "eval.metrics=[fid]", f"eval.reference={ref}").eval
    before = evaluation_settings(fid)
    assert evaluation_settings(load(tmp_path, "eval.metrics=[fid]", f"eval.reference={ref}").eval) == before
    np.savez(tmp_path / "copy.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert evaluation_settings(load(tmp_path, "eval.metrics=[fid]", f"eval.reference={tmp_path}/copy.npz").eval) != before
    np.savez(ref, arr_0=np.ones((2, 8, 8, 3), np.uint8))  # other images of the same size at the same URL
    assert evaluation_settings(fid)["reference"] == before["reference"] and evaluation_settings(fid) != before
    (tmp_path / "cut.npz").write_bytes((tmp_path / "copy.npz").read_bytes()[:40])  # an upload cut short
    with pytest.raises(ValueError, match=rf"{tmp_path}/cut.npz: not a readable .npz .*expected an ADM reference"):
        evaluation_settings(load(tmp_path, "eval.metrics=[fid]", f"eval.reference={tmp_path}/cut.npz").eval)
    storage.write_json(RunPaths(m_cfg).metrics, {**record, "num_samples": 3})  # of other samples
    assert not pipeline.metrics_done(m_cfg)
    storage.write_json(RunPaths(m_cfg).metrics, {k: v for k, v in record.items() if k != "evaluation"})
    assert not pipeline.metrics_done(m_cfg)  # written before the settings were recorded: not known to match
    storage.write_json(RunPaths(m_cfg).metrics, {k: v for k, v in record.items() if k != "samples_digest"})
    assert not pipeline.metrics_done(m_cfg)  # nor before the samples' digest was
    storage.write_json(RunPaths(m_cfg).metrics, record)
    assert pipeline.metrics_done(m_cfg)
    # the samples made again with the same settings (weights trained again to the same step, at the same URL):
    # the record's settings and count still match, the bytes do not
    again = SamplesManifest.read(RunPaths(m_cfg).samples)
    again.shards[0] = {**again.shards[0], "sha256": "1" * 64}
    again.write(RunPaths(m_cfg).samples)
    assert not pipeline.metrics_done(m_cfg)


def test_metrics_evaluated_with_the_digits_classifier_the_job_trains_are_done_in_the_plan(tmp_path):
    """The reproduce job trains the digits classifier when it has no weights and records their URL in
    metrics.json: its plan evaluates with that URL too, so a finished run's evaluate stages read as done."""
    cfg = load(tmp_path, "eval.feature_extractor=digits-cnn", "eval.methods=[static]")
    made = pipeline.with_values(cfg, eval={"feature_extractor_weights": RunPaths(cfg).weights("digits-cnn")})
    m_cfg = pipeline.method_config(made, "static", None, {})
    manifest = finish_samples(m_cfg)
    storage.write_json(RunPaths(m_cfg).metrics, {"metrics": {"isc_mean": 1.0}, "num_samples": manifest.num_samples,
                                                 "sampling": manifest.settings,
                                                 "samples_digest": manifest.content_digest(),
                                                 "evaluation": evaluation_settings(m_cfg.eval)})
    stages = {s.name: s.work for s in preflight.plan(cfg, "reproduce").stages}
    assert stages["evaluate static"] == "outputs exist, skipped"


def test_a_reference_that_cannot_be_one_is_refused_before_stage_1(tmp_path):
    latents = load(tmp_path, "data.vae=stabilityai/sd-vae-ft-ema", "eval.metrics=[fid]")
    assert "which holds stabilityai/sd-vae-ft-ema latents, not images" in problems(latents)["eval.reference"]
    assert "eval.reference" not in problems(load(tmp_path, "eval.metrics=[fid]"))  # a folder of pixels is one
    given = load(tmp_path, "data.vae=stabilityai/sd-vae-ft-ema", "eval.metrics=[fid]", f"eval.reference={tmp_path}/ref.npz")
    assert "latents" not in problems(given).get("eval.reference", "")
    assert "unset it" in problems(load(tmp_path, f"eval.samples={tmp_path}/s"))["eval.samples"]


def test_a_method_that_does_not_fit_the_config_is_refused_before_stage_1(tmp_path):
    cfg = load(tmp_path, "eval.methods=[static,eb_cache]")  # the default EB-Cache table is of 50 steps, not 10
    assert "sample.method=eb_cache: sample.eb_cache.schedule has 50 steps but sample.steps=10" in problems(cfg)[
        "eval.methods"]
    fits = load(tmp_path, "eval.methods=[static,eb_cache]", "sample.eb_cache.schedule='0120120120'")
    assert "eval.methods" not in problems(fits)


def _image_folder(root, value: int = 0) -> str:
    from PIL import Image

    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), value + c, np.uint8), "L").save(root / str(c) / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("override", ["data.source=OTHER", "data.seed=7", "data.shard_size=5",
                                      "data.latent_dtype=float32", "data.flip=true"])
def test_a_complete_data_set_is_reused_only_with_the_settings_it_was_prepared_with(tmp_path, override):
    """Prepare is skipped on a complete data set of this run only when the config would prepare it the same
    way (as jobs.prepare refuses another way): a changed source, seed, shard size, dtype or flip stops the job
    before stage 1, naming the change; a data set given without data.source is taken as it is."""
    from dydit_dist.data import pipeline as data_pipeline
    from dydit_dist.data.manifest import Manifest

    source = _image_folder(tmp_path / "images")
    base = ["data.shard_size=10"]
    cfg = load(tmp_path, f"data.source={source}", *base)
    settings, plan = data_pipeline.plan(cfg)
    manifest = Manifest(settings, len(plan.chunks))
    manifest.complete = True
    manifest.write(cfg.data.uri)
    assert pipeline.data_done(cfg) and "storage.run" not in problems(cfg)
    other = override.replace("OTHER", _image_folder(tmp_path / "other", 100))
    changed = load(tmp_path, f"data.source={source}", *base, other)
    key = other.split("=")[0].removeprefix("data.")
    with pytest.raises(pipeline.OutputsDiffer, match=rf"prepared with other settings \({key}: .* there vs .* now\)"):
        pipeline.data_done(changed)
    assert f"{key}: " in problems(changed)["storage.run"]
    given = load(tmp_path, *base, other if not other.startswith("data.source") else "data.seed=0", "data.source=null")
    assert pipeline.data_done(given)  # no data.source: a data set prepared elsewhere, used as it is


def test_a_resumable_fine_tune_with_changed_settings_is_refused_before_stage_1(tmp_path):
    """A fine-tune killed after a committed checkpoint resumes only with its settings (as jobs.finetune
    checks before it starts): the plan refuses a changed lr before prepare and every earlier stage run."""
    cfg = load(tmp_path)
    finetune = pipeline.finetune_config(cfg, None, "dydit")
    run_config.save(finetune, "finetune")
    storage.write_json(storage.join(RunPaths(finetune).checkpoints, "checkpoint_manager_snapshot.json"),
                       {"latest_checkpoint_result": {"x": 1}})  # committed, not finished
    assert "storage.run" not in problems(cfg)
    found = problems(load(tmp_path, "train.lr=0.001"))["storage.run"]
    assert "resumes from a checkpoint made with other settings (train.lr: 0.0001 -> 0.001)" in found, found


def test_the_report_says_how_a_reused_fine_tune_ran(tmp_path):
    """Workers and ZeRO stage do not decide the weights, so a fine-tune of 2 workers under ZeRO-2 is reused by
    a config of 1 worker under ZeRO-3: the report's note says how it ran, not how this config would run it."""
    run = finish_finetune(load(tmp_path, "ray.num_workers=2", "deepspeed.zero_stage=2"))
    now = pipeline.finetune_config(load(tmp_path, "ray.num_workers=1", "deepspeed.zero_stage=3"), None, "dydit")
    assert pipeline.finetune_done(now)
    assert "on 2 workers, ZeRO-2" in pipeline.finetune_note(now, run)


def test_a_data_set_whose_manifest_lacks_a_setting_counts_as_other_settings(tmp_path):
    """As jobs.prepare counts it: a data set made before a setting was recorded is not known to match."""
    from dydit_dist.data import pipeline as data_pipeline
    from dydit_dist.data.manifest import Manifest

    source = _image_folder(tmp_path / "images")
    cfg = load(tmp_path, f"data.source={source}", "data.shard_size=10")
    settings, plan = data_pipeline.plan(cfg)
    manifest = Manifest({k: v for k, v in settings.items() if k != "seed"}, len(plan.chunks))
    manifest.complete = True
    manifest.write(cfg.data.uri)
    with pytest.raises(pipeline.OutputsDiffer, match=r"\(seed: None there vs 0 now\).*or set data.source=null"):
        pipeline.data_done(cfg)


def test_a_lost_ray_snapshot_is_a_problem_of_the_plan(tmp_path):
    """A fine-tune whose Ray snapshot was cut by a full disk: the plan names it (the preflight crashed with the
    CheckpointError's traceback) and nothing is removed."""
    cfg = load(tmp_path)
    run = finish_finetune(cfg)
    storage.write_bytes(f"{run}/checkpoints/checkpoint_manager_snapshot.json", b'{"checkpoint_res')
    storage.write_bytes(f"{run}/checkpoints/step-0000020/meta.json", b"{}")
    found = problems(load(tmp_path, "train.max_steps=40"))["storage.run"]
    assert "checkpoint_manager_snapshot.json is not the JSON Ray Train writes" in found, found
    assert storage.exists(f"{run}/checkpoints/step-0000020/meta.json")


def test_a_fine_tune_of_earlier_weights_is_refused_also_when_its_snapshot_is_lost(tmp_path):
    """has_checkpoint raises for a lost snapshot (the EMA pointer shows a commit); checked first, it hid the
    pointer that decides this refusal, and the old fine-tune was reused without a word."""
    cfg = load(tmp_path, "eval.pretrain_config=reproduce_debug_pretrain")
    run = finish_finetune(cfg, RunPaths(pipeline.pretrain_config(cfg)).url)
    storage.remove(f"{run}/checkpoints/checkpoint_manager_snapshot.json")
    assert "holds a finetune of earlier model.checkpoint weights" in problems(cfg)["storage.run"]
