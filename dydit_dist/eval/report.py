"""`report.md` and `plots/` of a comparison: quality, FLOPs and measured speed of each method side by side.

    write_report(RunPaths(cfg), [metrics_static, metrics_dydit])   # metrics.json records

Plots (matplotlib, Agg): FID against GFLOPs, DyDiT's active width against the timestep, a grid of
the first samples of every method, and the training runs' curves (loss; DyDiT's FLOPs ratio against
its target) read back from their TensorBoard event files (`training_scalars`). A number computed on
features other than Inception's is labelled with its extractor ("FID [digits-cnn]"); it is never
presented as an Inception FID.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile

import numpy as np

from dydit_dist import storage
from dydit_dist.paths import RunPaths
from dydit_dist.sample.export import iter_samples
from dydit_dist.sample.manifest import SamplesManifest
from dydit_dist.sample.shards import to_rgb

from .metrics import EvalInputError

log = logging.getLogger(__name__)
ROWS, COLS = 8, 10  # samples in a method's grid


def _fmt(value, digits: int = 2, spec: str = "f") -> str:
    return "n/a" if value is None else f"{value:.{digits}{spec}}"


def metric_name(record: dict, metric: str) -> str:
    fe = record["feature_extractor"]
    base = {"fid": "FID", "sfid": "sFID", "isc": "IS", "precision": "precision", "recall": "recall"}[metric]
    if fe["is_inception"]:
        return base
    other = ", not torch-fidelity's weights" if fe["name"] == "inception-v3-compat" else ""
    return f"{base} [{fe['name']}{other}]"


def _save(fig, url: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    storage.write_bytes(url, buf.getvalue())


def _fid_vs_flops(records, url):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for r in records:
        if r.get("gflops") is not None and "fid" in r["metrics"]:
            ax.scatter(r["gflops"], r["metrics"]["fid"], s=40)
            ax.annotate(r["label"], (r["gflops"], r["metrics"]["fid"]), textcoords="offset points", xytext=(5, 5))
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4))
    ax.set_xlabel("GFLOPs per network forward (one image)")
    ax.set_ylabel(metric_name(records[0], "fid"))
    ax.set_title("Quality against compute")
    ax.grid(alpha=0.3)
    _save(fig, url)
    plt.close(fig)


def _width(records, url) -> bool:
    import matplotlib.pyplot as plt

    curves = [(r["label"], r["width"]) for r in records if r.get("width")]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for label, width in curves:
        t = [w["t"] for w in width]
        ax.plot(t, [w["heads"] for w in width], label=f"{label}: heads")
        ax.plot(t, [w["mlp"] for w in width], "--", label=f"{label}: MLP groups")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("active fraction (mean over blocks)")
    ax.set_ylim(0, 1.05)
    ax.invert_xaxis()  # sampling runs from t = 999 to 0
    ax.legend(fontsize=7)
    ax.set_title("DyDiT width against timestep")
    _save(fig, url)
    plt.close(fig)
    return True


def _grid(records, url) -> None:
    """The first ROWS x COLS samples of every method, sample k in column k % COLS (one class per
    column for 10-class models), 1-pixel grey separators, pixels shown as squares; fewer rows when a
    method has fewer samples."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(3.6 * len(records), 3.4), squeeze=False)
    for ax, r in zip(axes[0], records, strict=True):
        images = []
        for s in iter_samples(r["samples"]):
            images.append(to_rgb(s.image))
            if len(images) == ROWS * COLS:
                break
        h, w, _ = images[0].shape
        rows = -(-len(images) // COLS)
        canvas = np.full((rows * (h + 1) + 1, COLS * (w + 1) + 1, 3), 96, np.uint8)
        for i, image in enumerate(images):
            top, left = 1 + (i // COLS) * (h + 1), 1 + (i % COLS) * (w + 1)
            canvas[top:top + h, left:left + w] = image
        ax.imshow(canvas, interpolation="nearest")
        ax.set_title(r["label"])
        ax.axis("off")
    _save(fig, url)
    plt.close(fig)


def _event_points(data: bytes) -> tuple[float, list[tuple[str, int, float]]]:
    """The wall time of the first event in the bytes of one TensorBoard event file (when its writer
    started), and (tag, step, value) of every scalar in it."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    with tempfile.TemporaryDirectory(prefix="dydit-events-") as folder:
        path = os.path.join(folder, "events")
        with open(path, "wb") as f:
            f.write(data)
        events = list(EventFileLoader(path).Load())
    return (events[0].wall_time if events else 0.0,
            [(v.tag, int(event.step), float(tensor_util.make_ndarray(v.tensor)))  # scalars come as tensors
             for event in events for v in event.summary.value if v.HasField("tensor")])


def training_scalars(url: str) -> dict[str, list[tuple[int, float]]]:
    """The scalars a training run logged under `url` (its `{run}/tensorboard`, `train.metrics.TensorBoardLog`):
    tag -> [(step, value)] in step order; {} when there is no event file. The files are read in the order
    their writers started (the first event's wall time); a resumed run's file starts at its checkpoint's
    step and replaces what the files before it logged from that step on (steps redone)."""
    try:  # not the temporaries of an upload cut short (`.events.out.tfevents...tmp`)
        names = [u for u in storage.listdir(url) if u.rsplit("/", 1)[-1].startswith("events.out.tfevents.")]
    except FileNotFoundError:
        return {}
    series: dict[str, dict[int, float]] = {}
    for _, points in sorted(_event_points(storage.read_bytes(name)) for name in names):
        if not points:
            continue
        first = min(step for _, step, _ in points)
        series = {tag: {s: v for s, v in values.items() if s < first} for tag, values in series.items()}
        for tag, step, value in points:
            series.setdefault(tag, {})[step] = value
    return {tag: sorted(values.items()) for tag, values in series.items() if values}


def _training(runs: dict[str, dict], url: str) -> bool:
    """Loss against step for every training run (label -> `training_scalars` with a "loss"), and DyDiT's
    FLOPs ratio against its target; False (no plot) when there is no run."""
    import matplotlib.pyplot as plt

    if not runs:
        return False
    dynamic = {label: scalars for label, scalars in runs.items() if scalars.get("flops_ratio")}
    fig, axes = plt.subplots(1, 1 + bool(dynamic), figsize=(4.5 * (1 + bool(dynamic)), 3.5), squeeze=False)
    for label, scalars in runs.items():
        steps, loss = zip(*scalars["loss"], strict=True)
        axes[0][0].plot(steps, loss, label=label)
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("training loss (mean over the log window)")
    axes[0][0].set_title("Training loss")
    axes[0][0].legend(fontsize=7)
    for label, scalars in dynamic.items():
        steps, ratio = zip(*scalars["flops_ratio"], strict=True)
        line, = axes[0][1].plot(steps, ratio, label=f"{label}: FLOPs ratio")
        if scalars.get("lambda_t"):
            steps, target = zip(*scalars["lambda_t"], strict=True)
            axes[0][1].plot(steps, target, "--", color=line.get_color(), label=f"{label}: target")
    if dynamic:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("self-attention + MLP FLOPs / static")  # DyDiT's lambda: PixArt's cross-attention
        axes[0][1].set_title("DyDiT FLOPs ratio (routed layers)")  # and the embedders are outside it
        axes[0][1].legend(fontsize=7)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, url)
    plt.close(fig)
    return True


def _training_line(label: str, scalars: dict) -> str:
    """The report's bullet on a training run's last logged values."""
    step, loss = scalars["loss"][-1]
    line = f"{label} training: last logged step {step}, loss {loss:.4f}"
    if scalars.get("flops_ratio"):
        line += f", FLOPs ratio {scalars['flops_ratio'][-1][1]:.3f}"
        if scalars.get("lambda_t"):
            line += f" (target {scalars['lambda_t'][-1][1]:.3f})"
    return line + "."


def _check_comparable(records: list[dict]) -> None:
    """ValueError unless every record's metrics were taken with the same features and reference: the
    table's headers and notes describe the first record's, and numbers of two extractors do not compare."""
    def measured_with(r: dict) -> tuple:
        fe, ref = r["feature_extractor"], r.get("reference") or {}
        return fe["name"], fe.get("weights"), ref.get("url"), ref.get("statistics")

    kinds = {measured_with(r) for r in records}
    if len(kinds) > 1:
        listed = "; ".join(f"{r['label']}: features {measured_with(r)[0]} ({measured_with(r)[1]}), reference "
                           f"{measured_with(r)[2]}" for r in records)
        raise EvalInputError(f"the records were evaluated with other features or references ({listed}); evaluate "
                             "them with one eval config to compare them in one report")


def _per_method(records: list[dict], key: str) -> str:
    """The sampling setting `key` of the records: one value when they share it, else each method's."""
    values = [r["sampling"].get(key) for r in records]
    if all(v == values[0] for v in values):
        return str(values[0])
    return "(" + ", ".join(f"{r['label']}: {v}" for r, v in zip(records, values, strict=True)) + ")"


def write_report(paths: RunPaths, records: list[dict], title: str = "Comparison", notes: list[str] = (),
                 training: dict[str, str] | None = None) -> str:
    """Write the run's `report.md` and `plots/*.png` for metrics.json records; returns the report's
    URL. Each record may carry a "label" (default: its method); `notes` are extra bullets; `training`:
    label -> TensorBoard folder of each training run whose curves the report shows."""
    import matplotlib

    matplotlib.use("Agg")
    if not records:
        raise ValueError("write_report needs at least one metrics record")
    records = [dict(r) for r in records]
    for r in records:
        r.setdefault("label", r["method"])
        r["width"] = SamplesManifest.read(r["samples"]).stats.get("width_by_timestep")
    first = records[0]
    fe = first["feature_extractor"]
    _check_comparable(records)
    # 1. Plots
    plots = {name: paths.plot(f"{name}.png") for name in ("fid_vs_flops", "dydit_width", "samples_grid", "training")}
    _fid_vs_flops(records, plots["fid_vs_flops"])
    has_width = _width(records, plots["dydit_width"])
    _grid(records, plots["samples_grid"])
    runs = {label: training_scalars(url) for label, url in (training or {}).items()}
    runs = {label: scalars for label, scalars in runs.items() if scalars.get("loss")}
    has_training = _training(runs, plots["training"])
    for name, made in (("dydit_width", has_width), ("training", has_training)):
        if not made:  # an earlier report's plot would sit in plots/ as if it belonged to this one
            storage.remove(plots[name])
    # 2. The table
    fid, sfid, isc, precision, recall = (metric_name(first, m) for m in ("fid", "sfid", "isc", "precision", "recall"))
    clip = any("clip_score" in r["metrics"] for r in records)  # text-to-image (eval.protocol=coco)
    lines = [f"# {title}", "",
             f"| method | GFLOPs | images/s | {fid} | {sfid} | {isc} | {precision} | {recall} |"
             + (" CLIP score |" if clip else "") + " samples |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if clip else "") + "---:|"]
    for r in records:
        m = r["metrics"]
        lines.append(f"| {r['label']} | {_fmt(r.get('gflops'), 4, 'g')} | {_fmt(r.get('images_per_s'), 1)} | "
                     f"{_fmt(m.get('fid'))} | {_fmt(m.get('sfid'))} | {_fmt(m.get('isc_mean'))} | "
                     f"{_fmt(m.get('precision'), 3)} | {_fmt(m.get('recall'), 3)} | "
                     + (f"{_fmt(m.get('clip_score'))} | " if clip else "") + f"{r['num_samples']} |")
    ref = first.get("reference") or {}
    lines += [
        "",
        "- GFLOPs: multiply-accumulates (the papers' convention) per network forward of one image (guidance "
        "doubles it per sampling step), averaged over the sampling steps; the analytic count of DiT / PixArt, "
        "torch's FlopCounterMode for SD-XL.",
        "- images/s: per sampling actor (sampling and decoding, storage writes excluded), each method in its own "
        "stage, one after another (warm-up and any compile included): not a side-by-side speed comparison; "
        "`benchmarks/` measure speedups side by side.",
        f"- Features: {fe['label']}; weights: {fe['weights']}"
        + (f"; sFID on {fe['layers']['sfid']}." if "sfid" in fe.get("layers", {}) else "."),
        *([f"- CLIP score: 100 x max(cos(image, caption), 0) with {first.get('clip_model')}, mean over samples; "
           f"protocol {first.get('protocol')}."] if clip else []),
        f"- Reference: {ref.get('url')} ({ref.get('kind')}; statistics {ref.get('statistics')}).",
        f"- Sampling: {_per_method(records, 'sampler')}, {_per_method(records, 'steps')} steps, guidance "
        f"{_per_method(records, 'cfg_scale')}, seed {_per_method(records, 'seed')}, "
        f"{_per_method(records, 'num_samples')} samples per method"
        + (f", labels {_per_method(records, 'labels')}" if any(r["sampling"].get("labels") for r in records) else "")
        + f"; network {_per_method(records, 'precision')} (TF32 {_per_method(records, 'tf32')}), VAE "
        f"{_per_method(records, 'vae_precision')} (the official samplers: fp32 / TF32); torch-fidelity "
        f"{first['torch_fidelity_version']}.",
        *(f"- {r['label']} options: " + ", ".join(f"{k}={v}" for k, v in r["sampling"]["method_options"].items())
          for r in records if r["sampling"].get("method_options")),
        *(f"- {note}" for note in notes),
        *(f"- {_training_line(label, scalars)}" for label, scalars in runs.items()),
        "",
        f"![{fid} against GFLOPs]({paths.relative(plots['fid_vs_flops'])})",
    ]
    if has_width:
        lines.append(f"![DyDiT width against timestep]({paths.relative(plots['dydit_width'])})")
    if has_training:
        lines.append(f"![training curves]({paths.relative(plots['training'])})")
    lines += [f"![samples]({paths.relative(plots['samples_grid'])})", ""]
    url = paths.report
    storage.write_bytes(url, "\n".join(lines).encode())
    log.info("report at %s", url)
    return url
