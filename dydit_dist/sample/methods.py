"""The sampling method of a job, chosen only through `dydit_dist.accel.build_runner`.

`sample.method` names it (static, dydit, fora, eb_cache, at_edm); `sample.method_options` holds the
method's options as a mapping of its options dataclass's fields (e.g. `{interval: 3}` for FORA,
`{schedule: "0000...", eps_scale: paper}` for EB-Cache, `{ratio: 0.5}` for AT-EDM).
"""

from __future__ import annotations

from dydit_dist.accel.methods import METHODS, build_runner
from dydit_dist.config import Config


def build_method(cfg: Config, model):
    """The runner of `cfg.sample.method` on `model` (callable like the model; see `accel.base.Runner`)."""
    method = cfg.sample.method
    if method not in METHODS:
        raise ValueError(f"sample.method={method!r} has no sampling runner yet; available: {', '.join(METHODS)}")
    return build_runner(method, model, dict(cfg.sample.method_options) or None)
