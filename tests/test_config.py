"""Config files, arg strings, ablation presets and validation errors."""
import pytest

from mashvlm_jax import config_lib
from mashvlm_jax.model.config import ModelConfig
from conftest import load_config


@pytest.mark.parametrize("name", sorted(config_lib.ABLATIONS))
def test_every_ablation_builds(name):
  cfg = ModelConfig.from_dict(load_config("tiny_synthetic", f"ablation={name}").model)
  preset = config_lib.ABLATIONS[name]
  assert cfg.rope_mode == preset["rope_mode"]
  assert cfg.mask.as_kwargs() == {**cfg.mask.as_kwargs(), **preset["mask"]}


def test_paper_rows_are_consistent():
  a = config_lib.ABLATIONS
  # Table 5's best row is Table 6's first row; Table 6's last row is Table 7's first.
  assert a["t5_causal_bi"] == a["t6_disable_spatial_to_temporal"]
  assert a["t6_disable_both"] == a["t7_distinct"]
  assert a["mash"]["mask"] == dict(temporal="causal", spatial="bidirectional",
                                   temporal_sees_spatial=False, spatial_sees_temporal=False)
  assert a["baseline"]["rope_mode"] == "distinct"


def test_unknown_keys_are_named():
  config = load_config("tiny_synthetic")
  config.model.llm.num_layer = 3
  with pytest.raises(ValueError, match=r"model\.llm\.num_layer"):
    ModelConfig.from_dict(config.model)
  with pytest.raises(ValueError, match="unknown config argument 'ablations'"):
    load_config("tiny_synthetic", "ablations=mash")
  with pytest.raises(ValueError, match="unknown ablation"):
    load_config("tiny_synthetic", "ablation=t9")


def test_bad_values_are_named():
  config = load_config("tiny_synthetic")
  config.model.rope_mode = "rotary"
  with pytest.raises(ValueError, match="model.rope_mode"):
    ModelConfig.from_dict(config.model)
  config = load_config("tiny_synthetic")
  config.model.llm.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig.from_dict(config.model)


def test_parse_arg_types():
  arg = config_lib.parse_arg("a=3,b=true,c=x", a=1, b=False, c="y", d=0.5)
  assert (arg.a, arg.b, arg.c, arg.d) == (3, True, "x", 0.5)
