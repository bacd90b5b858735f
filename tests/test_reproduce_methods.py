"""What `jobs.reproduce` runs for each preset: the paper's comparison (static against the preset's
method), a fine-tune per trained method (DyDiT, FlexDiT) from the static weights, and no data
preparation when nothing needs it. Plans (`preflight.plan`), and the pipeline with its Ray stages faked."""

from __future__ import annotations

import pytest

from dydit_dist import config, pipeline, preflight
from dydit_dist.models import family
from dydit_dist.paths import RunPaths


@pytest.mark.parametrize("preset", sorted(config.presets()))
def test_each_preset_compares_static_with_its_own_method(preset):
    """A preset of a method reproduces that method: `--config flexdit_xl2_256` fine-tunes a FlexDiT,
    not a DyDiT; `--config eb_cache_dit_xl2_256_50` samples with EB-Cache and trains nothing."""
    cfg = config.load(preset)
    methods = cfg.eval.methods
    assert methods[0] == "static" and len(set(methods)) == len(methods), methods
    if cfg.sample.method != "static":
        assert cfg.sample.method in methods, f"{preset}: sample.method={cfg.sample.method} is not in eval.methods={methods}"
    if cfg.model.method != "static":  # a preset of a trained network compares that network
        assert cfg.model.method in methods, f"{preset}: model.method={cfg.model.method}, eval.methods={methods}"
    if family(cfg.model.name) == "sdxl":
        assert not pipeline.trains(cfg)


def stages(preset: str, tmp_path, *overrides) -> list[str]:
    cfg = config.load(preset, [f"storage.root=file://{tmp_path}", "storage.run=r", *overrides])
    return [s.name for s in preflight.plan(cfg, "reproduce").stages]


def test_flexdit_preset_fine_tunes_a_flexdit(tmp_path):
    assert stages("flexdit_xl2_256", tmp_path) == [
        "prepare", "finetune-flexdit", "sample static", "evaluate static", "sample flexdit", "evaluate flexdit", "report"]
    cfg = config.load("flexdit_xl2_256", [f"storage.root=file://{tmp_path}", "storage.run=r"])
    static = pipeline.static_weights(cfg)
    assert static == cfg.train.init_from == "DiT-XL-2-256x256.pt"  # the official checkpoint it starts from
    finetune = pipeline.finetune_config(cfg, static, "flexdit")
    assert finetune.model.method == "flexdit" and finetune.train.init_from == static
    assert finetune.model.flexdit == cfg.model.flexdit and finetune.storage.run == "r/finetune-flexdit"
    trained = {"flexdit": RunPaths(finetune).url}
    rows = {m: pipeline.method_config(cfg, m, static, trained) for m in cfg.eval.methods}
    assert (rows["static"].model.method, rows["static"].model.checkpoint) == ("static", static)
    assert (rows["flexdit"].model.method, rows["flexdit"].model.checkpoint) == ("flexdit", trained["flexdit"])
    assert rows["flexdit"].sample.method == "flexdit" and rows["flexdit"].storage.run == "r/flexdit"
    note = pipeline.finetune_note(finetune, trained["flexdit"])
    assert note.startswith("FlexDiT weights: the static ones fine-tuned 1000000 more steps (layout PPCSSSRDC")


def test_each_trained_method_has_its_own_fine_tune(tmp_path):
    assert stages("dydit_xl2_256_lambda0.5", tmp_path, "eval.methods=[static,dydit,flexdit]") == [
        "prepare", "finetune", "finetune-flexdit", "sample static", "evaluate static", "sample dydit",
        "evaluate dydit", "sample flexdit", "evaluate flexdit", "report"]
    cfg = config.load("dydit_xl2_256_lambda0.5")
    assert pipeline.finetune_config(cfg, None, "dydit").storage.run.endswith("/finetune")  # runs on storage keep it
    note = pipeline.finetune_note(pipeline.finetune_config(cfg, None, "dydit"), "W")
    assert note == "DyDiT weights: the static ones fine-tuned 200000 more steps at lambda 0.5 on 8 workers, ZeRO-2 (W)."


def test_eb_cache_preset_trains_nothing(tmp_path):
    assert stages("eb_cache_dit_xl2_256_50", tmp_path, "eval.reference=/refs/VIRTUAL_imagenet256_labeled.npz") == [
        "sample static", "evaluate static", "sample eb_cache", "evaluate eb_cache", "report"]


def test_data_are_prepared_only_when_a_stage_needs_them(tmp_path):
    """Training-free DiT methods against a given reference read no data: no prepare stage, no VAE to
    encode with; a trained method, or no eval.reference, brings the prepare stage back."""
    base = [f"storage.root=file://{tmp_path}", "storage.run=r", "data.source=/nonexistent/images",
            "eval.reference=/nonexistent/ref.npz"]
    free = config.load("debug", [*base, "eval.methods=[static,fora]"])
    assert not pipeline.needs_data(free) and not pipeline.makes_caption_reference(free)
    stages = [s.name for s in preflight.plan(free, "reproduce").stages]
    assert stages == ["sample static", "evaluate static", "sample fora", "evaluate fora", "report"]
    assert pipeline.needs_data(config.load("debug", [*base, "eval.methods=[static,dydit]"]))
    assert pipeline.needs_data(config.load("debug", [*base[:-1], "eval.methods=[static,fora]"]))


def test_a_pixart_fine_tune_needs_its_length(tmp_path):
    """PixArt's recipe is 200 epochs of a data set it does not give: its presets leave train.max_steps at 0,
    which a fine-tune refuses by name (a default would have ended the run inside the 1000-step warm-up)."""
    def problems(*overrides) -> list[str]:
        cfg = config.load("flexdit_pixart_xl2_256", [f"storage.root=file://{tmp_path}", "storage.run=r", *overrides])
        return [f"{i.key}: {i.problem}" for i in preflight.plan(cfg, "finetune").inputs if i.problem]

    assert "train.max_steps: the preset gives no training length" in "\n".join(problems())
    assert not any(p.startswith("train.max_steps") for p in problems("train.max_steps=50000"))


def test_each_stage_holds_the_lease_of_the_folder_it_writes(tmp_path, monkeypatch):
    """jobs.reproduce samples into `{run}/{method}` under that folder's lease, as jobs.sample on that folder
    holds it: two jobs never write one samples folder (a jobs.sample of `r/fora` started beside a reproduce
    of `r` used to be let in, and both wrote shards of their own settings)."""
    from dydit_dist import lease as lease_lib

    cfg = config.load("debug", [f"storage.root=file://{tmp_path}", "storage.run=r", "eval.methods=[static,fora]",
                                f"eval.reference={tmp_path}/ref.npz", "eval.feature_extractor_weights=w.pth"])
    held = {}
    monkeypatch.setattr(pipeline, "connect_ray", lambda address: None)
    monkeypatch.setattr(pipeline, "run_sampling", lambda c: held.setdefault(
        f"sample {c.sample.method}", [lease.url for lease in lease_lib.held()]))
    monkeypatch.setattr(pipeline, "evaluate", lambda c: held.setdefault(
        f"evaluate {c.sample.method}", [lease.url for lease in lease_lib.held()]) and {})
    monkeypatch.setattr(pipeline, "write_report", lambda *args: "report")
    assert pipeline.reproduce(cfg) == "report"
    for method in ("static", "fora"):
        for stage in ("sample", "evaluate"):
            assert held[f"{stage} {method}"] == [f"file://{tmp_path}/runs/r/{method}/lease"]
    assert lease_lib.held() == []  # each released when its stage ended
    other = lease_lib.Lease.acquire(f"file://{tmp_path}/runs/r/fora/lease", "sample", ttl_s=60)
    try:
        held.clear()
        with pytest.raises(lease_lib.LeaseHeld, match=r"runs/r/fora/lease: the run is held by job 'sample'"):
            pipeline.reproduce(cfg)
        assert "sample fora" not in held
    finally:
        other.release()


def test_an_earlier_report_is_removed_when_the_job_starts(tmp_path, monkeypatch):
    """A rerun that fails part-way must not leave the last run's report.md describing samples or weights it
    has started to make again: the report is removed first and written only when every stage is done."""
    from dydit_dist import storage

    cfg = config.load("debug", [f"storage.root=file://{tmp_path}", "storage.run=r", "eval.methods=[static]",
                                f"eval.reference={tmp_path}/ref.npz", "eval.feature_extractor_weights=w.pth"])
    report = RunPaths(cfg).report
    storage.write_bytes(report, b"# an earlier run's numbers")
    monkeypatch.setattr(pipeline, "connect_ray", lambda address: None)

    def sampling_fails(c):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(pipeline, "run_sampling", sampling_fails)
    with pytest.raises(RuntimeError, match="the cluster went away"):
        pipeline.reproduce(cfg)
    assert not storage.exists(report)
    monkeypatch.setattr(pipeline, "run_sampling", lambda c: None)
    monkeypatch.setattr(pipeline, "evaluate", lambda c: {})
    monkeypatch.setattr(pipeline, "write_report", lambda paths, *args: storage.write_bytes(paths.report, b"new") or paths.report)
    assert pipeline.reproduce(cfg) == report and storage.read_bytes(report) == b"new"
    static = RunPaths(pipeline.method_config(cfg, "static", "w.pt", {}))
    for job in ("sample", "evaluate"):  # each stage's config beside its outputs, as its own job writes it
        assert storage.exists(static.config(job)), job
