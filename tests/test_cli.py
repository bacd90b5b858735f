"""`cli.parse_args`: the arguments every job shares, and a bad config as one line `job: message`, exit 2."""

from __future__ import annotations

import pytest

from dydit_dist import cli


def test_options_may_come_between_overrides(tmp_path):
    parser = cli.job_parser("sample", "test")
    cfg, args = cli.parse_args(parser, ["--config", "debug", f"storage.root={tmp_path}", "--dry-run",
                                        "sample.steps=5"])
    assert args.dry_run and cfg.sample.steps == 5 and cfg.storage.root == str(tmp_path)


def test_a_config_folder_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(cli.job_parser("sample", "test"), ["--config", str(tmp_path), "--dry-run"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"sample: config {tmp_path} is a folder; expected a YAML file (.yaml or .yml)\n"
