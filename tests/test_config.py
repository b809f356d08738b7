"""Config validation: one place, messages that name the key and the allowed range."""

import pytest

from drive_mbrl.config import (
    BenchCollectConfig,
    CollectConfig,
    EvaluateConfig,
    ExportConfig,
    FitConfig,
    PipelineConfig,
    PlannerConfig,
    validate,
    with_scenario_planner,
)
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


def test_nan_empty_lists_and_unknown_devices_are_refused():
    with pytest.raises(ConfigError, match="lr=nan is out of range"):
        validate(FitConfig(lr=float("nan")))
    with pytest.raises(ConfigError, match="planner.gamma=nan is out of range"):
        validate(EvaluateConfig(planner=PlannerConfig(gamma=float("nan"))))
    with pytest.raises(ConfigError, match=r"workers=\[\] is empty"):
        validate(BenchCollectConfig(workers=[]))
    with pytest.raises(ConfigError, match=r"collect_agents=\[\] is empty"):
        validate(PipelineConfig(collect_agents=[]))
    with pytest.raises(ConfigError, match="planner.device='gpu' is not allowed"):
        validate(EvaluateConfig(planner=PlannerConfig(device="gpu")))
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        validate(EvaluateConfig(planner=PlannerConfig(device=device)))


def _scenario_file(tmp_path, planner: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nenv_id: highway-fast-v0\nplanner: {planner}\n")
    return str(path)


def test_scenario_planner_settings_apply_unless_set_on_the_command_line():
    cfg, taken = with_scenario_planner(EvaluateConfig(scenario="roundabout", agent="mpc"))
    assert (cfg.planner.lookahead, cfg.planner.ego_model) == (0, "learned")
    assert taken == {"ego_model": "learned", "lookahead": 0}
    kept = EvaluateConfig(scenario="roundabout", planner=PlannerConfig(lookahead=3))
    cfg, taken = with_scenario_planner(kept, frozenset({"planner.lookahead", "episodes"}))
    assert (cfg.planner.lookahead, cfg.planner.ego_model) == (3, "learned") and taken == {"ego_model": "learned"}
    merge = EvaluateConfig(scenario="merge")
    assert with_scenario_planner(merge) == (merge, {}), "a scenario without a planner block changes nothing"
    cfg, taken = with_scenario_planner(EvaluateConfig(scenario="highway"))
    assert cfg.planner.dead_end_speed == 20.0 and taken == {"dead_end_speed": 20.0, "reward": "learned"}
    fit = FitConfig()
    assert with_scenario_planner(fit) == (fit, {}), "a config without scenario and planner is left alone"
    whole = EvaluateConfig(scenario="roundabout", planner=PlannerConfig(lookahead=2))
    assert with_scenario_planner(whole, frozenset({"planner"})) == (whole, {}), "planner={...} sets them all"
    export = ExportConfig()
    assert with_scenario_planner(export) == (export, {}), "an empty scenario applies nothing"


@pytest.mark.parametrize(("planner", "words"), [
    ("{lookahed: 0}", ["'lookahed' does not exist", "lookahead"]),
    ("{lookahead: fast}", ["planner.lookahead='fast'", "int"]),
    ("{lookahead: true}", ["planner.lookahead=True", "int"]),
    ("{lookahead: -1}", ["mine.yaml", "planner.lookahead=-1 is out of range"]),
    ("{risk: var}", ["planner.risk='var' is not allowed"]),
    ("[lookahead]", ["planner must be a mapping"]),
])
def test_bad_scenario_planner_settings_name_the_file_and_key(tmp_path, planner, words):
    with pytest.raises(ConfigError) as err:
        with_scenario_planner(CollectConfig(scenario=_scenario_file(tmp_path, planner)))
    for word in words:
        assert word in str(err.value)


def test_scenario_planner_float_setting_accepts_a_yaml_integer(tmp_path):
    cfg, _ = with_scenario_planner(CollectConfig(scenario=_scenario_file(tmp_path, "{alpha: 1}")))
    assert cfg.planner.alpha == 1.0
