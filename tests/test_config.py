"""Config validation: one place, messages that name the key and the allowed range."""

import pytest

from drive_mbrl.config import BenchCollectConfig, CollectConfig, PipelineConfig, validate
from drive_mbrl.errors import ConfigError


def test_defaults_are_valid():
    for cls in (CollectConfig, PipelineConfig, BenchCollectConfig):
        validate(cls())


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"episodes": -1}, ["episodes=-1", "1 <= episodes"]),
    ({"workers": 0}, ["workers=0", "1 <= workers"]),
    ({"agent": "nope"}, ["agent='nope'", "random", "idm"]),
])
def test_bad_values_name_key_and_range(kwargs, words):
    with pytest.raises(ConfigError) as err:
        validate(CollectConfig(**kwargs))
    for word in words:
        assert word in str(err.value)


def test_list_items_are_checked():
    with pytest.raises(ConfigError, match="eval_agents='oracle'"):
        validate(PipelineConfig(eval_agents=["idm", "oracle"]))
    with pytest.raises(ConfigError, match="workers=0"):
        validate(BenchCollectConfig(workers=[1, 0]))
