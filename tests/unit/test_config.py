"""The OIP server's one Config: a setting read from its flag, and a bad value refused naming the setting."""

import pytest

from torchship.handlers.oip import main
from torchship.handlers.oip.config import TRACE_STAGES, Config, ConfigError


def test_trace_stages_come_from_the_flag_and_default_to_events():
    assert Config(("exports/x",)).trace_stages == "events" == TRACE_STAGES[0]
    assert main.config_from(["--model_dir", "exports/x", "--trace_stages", "spans"]).trace_stages == "spans"


@pytest.mark.parametrize(
    "change, says",
    [
        ({"trace_stages": "bars"}, "trace_stages 'bars'"),
        ({"backend": "tf"}, "backend 'tf'"),
        ({"max_batch": -1}, "max_batch"),
    ],
)
def test_a_bad_setting_is_refused_by_name(change, says):
    with pytest.raises(ConfigError, match=says):
        Config(("exports/x",), **change)
