"""`expert serve`'s options are declared once, in `ServeOptions`: each field is a flag with its default and help,
and what the flag is given reaches the field (checked by ServeOptions, exit 2 naming the flag)."""

from __future__ import annotations

from dataclasses import fields
from typing import get_args

import pytest
import typer.main
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.serving.options import ServeOptions, flag, serve_flags


def test_every_serve_option_is_a_flag_with_its_default_and_help():
    params = {p.name: p for p in typer.main.get_command(app).commands["serve"].params}
    assert set(params) == {"model_uri", "host", "port"} | {f.name for f in fields(ServeOptions)}
    for name, (kind, declared, default) in serve_flags().items():
        param = params[name]
        assert param.default == default and param.help == declared.help, name
        assert flag(name) in param.opts, name
        if bool in (kind, *get_args(kind)):
            assert "--no-" + flag(name)[2:] in param.secondary_opts, f"{name} is a switch"


@pytest.mark.parametrize(("args", "message"), [
    (["--frontier-down", "crash"], "--frontier-down crash: use `flag` or `502`"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--health-probe-interval", "0"], "--health-probe-interval 0.0: use a number of seconds above 0"),
    (["--tier-queue", "-1"], "--tier-queue must be 0 or more"),
])
def test_a_flag_reaches_its_field_and_a_bad_value_exits_2_before_anything_loads(args, message):
    result = CliRunner().invoke(app, ["serve", "models:/nowhere/1", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
