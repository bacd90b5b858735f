"""Options of the training-free methods: one frozen dataclass per method, validated when built.

The sample config maps onto these one to one (see `from_mapping`); strings are the config's form of
a cache schedule and of the exposure-bias correction, so a YAML file or a dotlist can carry them.

Cache schedule: one character per sampling step, first (noisiest) step first:
    0 compute both branches, 1 reuse attention + recompute MLP, 2 reuse both, 3 recompute attention
    + reuse MLP. The released EB-Cache 50-step table is `RELEASED_TABLE_50`.

Exposure-bias correction `eps_scale` (the predicted noise is MULTIPLIED by the factor at every step):
    "none"                            1, the output is untouched
    "released"                        1 / 0.965 (the released code divides eps by its delta 0.965; the default)
    "paper"                           1 / b(t/T), b: 1.0 at T, 0.98 at 0.4T, 0.96 at 0 (the factor piecewise
                                      linear between 1/b of the knots: within 2e-4 of 1 / a piecewise-linear b)
    "const:0.98"                      any constant
    "1.0:1.0,0.4:0.98,0.0:0.96"       knots `t_fraction:factor`, piecewise linear in t / (T - 1)

"paper" divides by b(t) as the released code divides by its constant delta (0.965, inside b's range) and
as epsilon scaling (Ning et al. 2024, which the exposure-bias reading follows) divides by its lambda_t;
the paper's own text was not at hand. Until 2026-12 "paper" multiplied by b(t), growing the correction the
other way; a samples folder records the factors (`pool._method_identity`), so one made then is other settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from dydit_dist import storage

RELEASED_TABLE_50 = "00000000000000000000002020202020202020202220220220"
TABLE_FORMAT = "dydit_dist.eb_cache_table/1"  # the JSON an EB-Cache calibration writes (`jobs.calibrate`)
CRITERIA = ("norm", "l2")  # how calibration measures a cached state's error (accel/calibrate.py)
CACHE_STATES = "0123"

EPS_SCALE_PRESETS = {
    "none": (),
    "paper": ((1.0, 1.0), (0.4, 1.0 / 0.98), (0.0, 1.0 / 0.96)),
    "released": ((1.0, 1.0 / 0.965),),
}


def parse_schedule(schedule: str) -> str:
    """Validate a cache schedule string (see the module docstring); returns it unchanged."""
    if not isinstance(schedule, str) or not schedule:
        raise ValueError(f"cache schedule must be a non-empty string over {CACHE_STATES!r}, got {schedule!r}")
    bad = sorted({c for c in schedule if c not in CACHE_STATES})
    if bad:
        raise ValueError(f"cache schedule {schedule!r} has characters {bad}; valid states are {CACHE_STATES!r} "
                         "(0 full, 1 reuse attention, 2 reuse both, 3 reuse MLP)")
    if schedule[0] != "0":
        raise ValueError(f"cache schedule {schedule!r} must start with a full step '0' (nothing is cached yet)")
    return schedule


def fora_schedule(num_steps: int, interval: int) -> str:
    """FORA: a full step every `interval` steps counted back from the last (t = 0) step, and the first step
    full too; both branches reused in between. The official sampler (prathebaselva/FORA `src/models.py`)
    counts its step index down from num_steps - 1 to 0 and computes when `step == num_steps - 1 or step %
    interval == 0`: the last step is always computed, the first is full because nothing is cached yet."""
    if interval < 1:
        raise ValueError(f"FORA interval must be >= 1, got {interval}")
    return "".join("0" if i == 0 or (num_steps - 1 - i) % interval == 0 else "2" for i in range(num_steps))


def parse_eps_scale(spec: str) -> tuple[tuple[float, float], ...]:
    """`eps_scale` string -> knots ((t_fraction, value), ...) sorted by t_fraction; () means none."""
    if spec in EPS_SCALE_PRESETS:
        return tuple(sorted(EPS_SCALE_PRESETS[spec]))
    try:
        if spec.startswith("const:"):
            knots = ((1.0, float(spec.removeprefix("const:"))),)
        else:
            knots = tuple((float(a), float(b)) for a, b in (item.split(":") for item in spec.split(",")))
    except ValueError:
        raise ValueError(
            f"eps_scale {spec!r} is not one of {sorted(EPS_SCALE_PRESETS)}, 'const:VALUE' or "
            "'T_FRACTION:VALUE,...' (e.g. '1.0:1.0,0.4:0.98,0.0:0.96')"
        ) from None
    for t, value in knots:
        if not 0.0 <= t <= 1.0 or not value > 0:
            raise ValueError(f"eps_scale {spec!r}: t fractions must lie in [0, 1] and values be > 0")
    return tuple(sorted(knots))


def eps_scale_at(knots: tuple[tuple[float, float], ...], t_fraction: float) -> float:
    """Piecewise-linear b(t) through the knots, constant beyond the first and last."""
    if not knots:
        return 1.0
    if t_fraction <= knots[0][0]:
        return knots[0][1]
    for (t0, v0), (t1, v1) in zip(knots[:-1], knots[1:], strict=True):
        if t_fraction <= t1:
            return v0 + (v1 - v0) * (t_fraction - t0) / (t1 - t0)
    return knots[-1][1]


@dataclass(frozen=True)
class FORAOptions:
    """FORA: recompute every `interval` steps, reuse both branches of every block in between."""

    interval: int = field(default=3, metadata={"range": "[1, inf)"})
    eps_scale = "none"  # not a field: FORA has no exposure-bias correction

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"FORA interval must be >= 1, got {self.interval}")

    def schedule_for(self, num_steps: int) -> str:
        return fora_schedule(num_steps, self.interval)


@dataclass(frozen=True)
class EBCacheOptions:
    """EB-Cache: per-block branch caching on a calibrated schedule, with exposure-bias correction.

    schedule: a cache schedule string, or the path / URL of a calibration table (`.json`, written by
        `python -m jobs.calibrate`) whose schedule is used.
    eps_scale: the exposure-bias correction of the predicted noise (see the module docstring).
    """

    schedule: str = RELEASED_TABLE_50
    eps_scale: str = "released"  # what produced the published FID (eps / 0.965); "paper" is eps / b(t)

    def __post_init__(self):
        if not self.schedule.endswith(".json"):
            parse_schedule(self.schedule)
        parse_eps_scale(self.eps_scale)

    def schedule_for(self, num_steps: int) -> str:
        """The schedule over `num_steps` sampling steps; it must have exactly that length."""
        schedule = self.schedule
        if schedule.endswith(".json"):
            schedule = parse_schedule(load_table(schedule)["schedule"])
        if len(schedule) != num_steps:
            raise ValueError(f"cache schedule has {len(schedule)} steps but sampling runs {num_steps}; "
                             "calibrate one for this step count (python -m jobs.calibrate)")
        return schedule


@dataclass(frozen=True)
class ATEDMOptions:
    """AT-EDM token pruning on a DiT (Wang et al., CVPR 2024), in two variants. The same options drive it
    on SD-XL's UNet (`accel.at_edm_unet`), where every attention block prunes and recovers by itself:
    score_layer and dense_last do not apply there, and dsap_layers counts the UNet's pruning layers in
    execution order (the down stage first).

    variant "per_layer" (the paper's scheme, the default): blocks score_layer .. depth - dense_last - 2
        each rank the tokens they carry by G-WPR on their OWN self-attention map and drop some of them
        after their FFN, so every later block carries fewer; before the last `dense_last` blocks the
        pruned tokens are recovered (last dropped first) and those blocks and the final layer run on
        every token. How many tokens each layer drops at each step is the DSAP plan (`accel.dsap`).
    variant "single" (this project's first adaptation): block `score_layer` ranks once and drops
        `ratio` of the tokens; blocks score_layer + 1 .. depth - dense_last - 1 run on the rest.

    ratio: the token budget: the fraction of tokens pruned, averaged over the blocks that can carry
        fewer (score_layer + 1 .. depth - dense_last - 1) and, for per_layer, over the sampling steps.
    score_layer: the first block that ranks and prunes (single: the only one).
    dense_last: how many last blocks run on every token again (after recovery).
    iterations: G-WPR power iterations.
    recovery: "copy" (a pruned token takes the current features of the kept token most similar to it,
        cosine similarity of the features where it was dropped) or "freeze" (it keeps those features).
    dsap_fraction: denoising-steps-aware pruning's early steps: the first `dsap_fraction` of them.
    dsap_layers (per_layer): the fraction of the pruning layers, those nearest the input, that the
        early steps leave unpruned; the later steps prune more so that the budget stays `ratio`.
    dsap_ratio (single): the early steps prune `dsap_ratio` (default nothing) instead of `ratio`; the
        budget is not moved to later steps.

    What is taken from the paper (its text, Figure 3 and abstract): G-WPR on the self-attention map
    (scores start uniform, s <- A^T s); the ranking repeated in each consecutive attention layer on that
    layer's map, tokens pruned after its FFN; pruned tokens recovered by similarity-based copy before
    the next operation that needs every token (on SD-XL a ResNet block); DSAP leaves selected
    attention blocks unpruned in the early steps and prunes more aggressively later, for the same
    overall budget; on SD-XL, 38.8% fewer FLOPs and up to 1.53x. What is derived here, not printed
    in the sources at hand: the same rate in every pruning layer of a step (`dsap.solve_rate`); the
    budget as the cost-weighted pruned-token fraction (`dsap.budget`); the SD-XL reference plan's
    early phase (the four down-stage attention blocks unpruned in the first 20% of the 50 steps,
    `dsap.sdxl_reference_plan`); the DiT plan by the same rule with the DiT as one segment, its first
    `dsap_layers` pruning layers playing the down stage's part; and the similarity of "copy" (cosine
    of the features where the token was dropped).
    """

    ratio: float = field(default=0.5, metadata={"range": "[0, 1)"})
    score_layer: int = field(default=2, metadata={"range": "[0, inf)"})
    dense_last: int = field(default=2, metadata={"range": "[0, inf)"})
    iterations: int = field(default=5, metadata={"range": "[1, inf)"})
    recovery: Literal["copy", "freeze"] = "copy"
    variant: Literal["per_layer", "single"] = "per_layer"
    dsap_fraction: float = field(default=0.2, metadata={"range": "[0, 1]"})
    dsap_layers: float = field(default=0.5, metadata={"range": "[0, 1]"})
    dsap_ratio: float = field(default=0.0, metadata={"range": "[0, 1)"})

    def __post_init__(self):
        for name in ("ratio", "dsap_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"AT-EDM {name} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("dsap_fraction", "dsap_layers"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AT-EDM {name} must lie in [0, 1], got {getattr(self, name)}")
        if self.recovery not in ("copy", "freeze"):
            raise ValueError(f"AT-EDM recovery must be 'copy' or 'freeze', got {self.recovery!r}")
        if self.variant not in ("per_layer", "single"):
            raise ValueError(f"AT-EDM variant must be 'per_layer' or 'single', got {self.variant!r}")
        if self.variant == "per_layer" and self.dsap_ratio != 0.0:
            raise ValueError("AT-EDM dsap_ratio applies to variant 'single'; per_layer's early steps leave "
                             "dsap_layers unpruned instead")
        if self.variant == "single" and self.dsap_layers != 0.5:
            raise ValueError("AT-EDM dsap_layers applies to variant 'per_layer'; single's early steps prune "
                             "dsap_ratio instead")
        if self.iterations < 1 or self.score_layer < 0 or self.dense_last < 0:
            raise ValueError("AT-EDM iterations must be >= 1, score_layer and dense_last >= 0")

    def ratio_at(self, step: int, num_steps: int) -> float:
        """variant "single": the pruning ratio of sampling step `step` (0 = noisiest) under its DSAP."""
        return self.dsap_ratio if step < self.early_steps(num_steps) else self.ratio

    def early_steps(self, num_steps: int) -> int:
        """How many of the first steps are DSAP's early ones."""
        return round(self.dsap_fraction * num_steps)

    def check_depth(self, depth: int) -> None:
        if self.score_layer + 2 + self.dense_last > depth:
            raise ValueError(f"AT-EDM score_layer={self.score_layer} and dense_last={self.dense_last} leave no "
                             f"block to prune in a {depth}-block model (need score_layer + 2 + dense_last <= depth)")


def load_table(url: str) -> dict:
    """Read an EB-Cache calibration table (`TABLE_FORMAT`); a clear error for anything else."""
    table = storage.read_json(url)
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or "schedule" not in table:
        raise ValueError(f"{url} is not an EB-Cache calibration table (format {TABLE_FORMAT!r})")
    return table


def from_mapping(cls, values: Mapping | None):
    """Build an options dataclass from a plain mapping (a config section); unknown keys are errors."""
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid: {', '.join(names)}")
    return cls(**values)
