"""Thin `python -m jobs.<name>` entry points: parse `--config NAME key=value ...`, call into `dydit_dist`."""
