"""The sampling method of a job, chosen only through `dydit_dist.accel.build_runner`.

`sample.method` names it (a key of `accel.methods.METHODS`); a method with options reads them from
its own typed section of the config (`sample.fora`, `sample.eb_cache`, `sample.at_edm`), checked
when the config is loaded.
"""

from __future__ import annotations

from dydit_dist.accel.methods import build_runner
from dydit_dist.config import Config


def build_method(cfg: Config, model):
    """The runner of `cfg.sample.method` on `model` (callable like the model; see `accel.base.Runner`)."""
    return build_runner(cfg.sample.method, model, cfg.sample.method_options)
