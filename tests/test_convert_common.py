"""The generic conversion engine: loaders (safetensors incl. bf16, torch pickles, shards), rules, errors, orbax I/O."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from msjax.convert import common
from msjax.convert.common import ConversionError, Rule

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _state(seed: int = 0) -> dict[str, "torch.Tensor"]:
  gen = torch.Generator().manual_seed(seed)
  return {
      "layers.0.w": torch.randn(3, 2, generator=gen),
      "layers.1.w": torch.randn(3, 2, generator=gen),
      "emb": torch.randn(4, generator=gen).to(torch.bfloat16),
      "table": torch.randn(1, 2, 5, generator=gen),
  }


def _assert_source_matches(source: common.TensorSource, state: dict) -> None:
  assert sorted(source.keys()) == sorted(state)
  for key, tensor in state.items():
    got = source.read(key)
    assert source.shapes[key] == tuple(tensor.shape)
    np.testing.assert_array_equal(np.asarray(got, np.float32), tensor.float().numpy())


def test_safetensors_reads_bf16_and_float32(tmp_path):
  state = _state()
  path = tmp_path / "ckpt.safetensors"
  safetensors_torch.save_file(state, str(path))
  source = common.open_checkpoint(path)
  _assert_source_matches(source, state)
  assert source.read("emb").dtype == np.dtype("bfloat16")


def test_safetensors_folder_of_shards_and_duplicates(tmp_path):
  state = _state()
  keys = sorted(state)
  safetensors_torch.save_file({k: state[k] for k in keys[:2]}, str(tmp_path / "a.safetensors"))
  safetensors_torch.save_file({k: state[k] for k in keys[2:]}, str(tmp_path / "b.safetensors"))
  _assert_source_matches(common.open_checkpoint(tmp_path), state)
  safetensors_torch.save_file({keys[0]: state[keys[0]]}, str(tmp_path / "c.safetensors"))
  with pytest.raises(ConversionError, match=keys[0].replace(".", r"\.")):
    common.open_checkpoint(tmp_path)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_torch_pickle_unwraps_nested_state_dicts(tmp_path, wrapper):
  state = _state(1)
  path = tmp_path / "ckpt.pth"
  torch.save(state if wrapper is None else {wrapper: state, "step": 7}, path)
  _assert_source_matches(common.open_checkpoint(path), state)


def test_torch_pickle_entry_and_errors(tmp_path):
  state = _state(2)
  path = tmp_path / "ckpt.pt"
  torch.save({"generator": state, "critic": _state(3)}, path)
  with pytest.raises(ConversionError, match="--entry"):
    common.open_checkpoint(path)
  _assert_source_matches(common.open_checkpoint(path, entry="generator"), state)
  with pytest.raises(ConversionError, match="'nope'"):
    common.open_checkpoint(path, entry="nope")
  good = tmp_path / "good.safetensors"
  safetensors_torch.save_file(state, str(good))
  with pytest.raises(ConversionError, match="only to torch"):
    common.open_checkpoint(good, entry="generator")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(ConversionError, match="bad.safetensors"):
    common.open_checkpoint(bad)
  other = tmp_path / "weights.npz"
  other.touch()
  with pytest.raises(ConversionError, match="unknown checkpoint type"):
    common.open_checkpoint(other)


def test_strip_common_prefix():
  source = common.from_state_dict({"model.a": np.ones(2), "model.b": np.zeros(3)})
  stripped = common.strip_common_prefix(source, ("module.", "model."))
  assert stripped.keys() == ["a", "b"]
  np.testing.assert_array_equal(stripped.read("a"), np.ones(2))
  assert common.strip_common_prefix(source, ("module.",)).keys() == ["model.a", "model.b"]


_RULES = (
    Rule(r"layers\.(?P<layer>\d+)\.w", "stack/kernel", common.linear_kernel),
    Rule(r"emb", "embed/scale"),
    Rule(r"table", "table", common.squeeze_leading, grow_axis=0),
    Rule(r"ignored\.\w+", None),
)


def _expected(layers: int = 2, table_rows: int = 2) -> dict:
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  return {"stack": {"kernel": spec(layers, 2, 3)}, "embed": {"scale": spec(4)}, "table": spec(table_rows, 5),
          "extra": {"w": spec(6)}}


def test_plan_and_materialize_apply_transforms():
  state = {k: v.float().numpy() for k, v in _state(4).items()}
  state["ignored.x"] = np.ones(1)
  source = common.from_state_dict(state)
  plan = common.plan_conversion(source, _RULES, _expected(table_rows=3), initialised=("extra",))
  assert plan.dropped == ("ignored.x",)
  assert plan.zero_filled == (common.ZeroFill("table", 0, 2, 3),)
  assert plan.initialised == ("extra/w",)
  params = common.materialize(plan, source, initial={"extra": {"w": np.arange(6.0)}})
  for layer in range(2):
    np.testing.assert_array_equal(params["stack"]["kernel"][layer], state[f"layers.{layer}.w"].T)
  np.testing.assert_array_equal(params["table"][:2], state["table"][0])
  np.testing.assert_array_equal(params["table"][2], 0.0)
  np.testing.assert_array_equal(params["extra"]["w"], np.arange(6.0))
  assert params["embed"]["scale"].dtype == np.float32
  assert "zero-initialised: table" in plan.summary() and "extra" in plan.summary()


def test_plan_lists_every_problem_at_once():
  state = {k: v.float().numpy() for k, v in _state(5).items()}
  state["layers.2.w"] = state.pop("layers.1.w")  # layer out of range; layer 1 missing
  state["emb"] = np.ones(7)  # wrong shape
  state["mystery.bias"] = np.ones(1)  # unknown
  with pytest.raises(ConversionError) as info:
    common.plan_conversion(common.from_state_dict(state, name="my.ckpt"), _RULES, _expected(), initialised=("extra",))
  message = str(info.value)
  assert "my.ckpt" in message
  assert "mystery.bias" in message and "emb -> embed/scale" in message
  assert "layers.2.w -> stack/kernel: the model has 2 layers" in message
  assert "stack/kernel (layers 1)" in message
  assert set(info.value.problems) == {"unknown keys (no rule matches)", "shape mismatches", "missing parameters"}


def test_grow_axis_refuses_a_wider_checkpoint():
  state = {k: v.float().numpy() for k, v in _state(6).items()}
  with pytest.raises(ConversionError, match="table"):
    common.plan_conversion(common.from_state_dict(state), _RULES, _expected(table_rows=1), initialised=("extra",))


def test_choose_rules_by_key_coverage():
  source = common.from_state_dict({"a.weight": np.ones(1), "b.weight": np.ones(1)})
  tables = {"first": (Rule(r"a\.weight", "a"),), "second": (Rule(r"[ab]\.weight", "x"),)}
  assert common.choose_rules(source, tables, what="toy") == "second"
  with pytest.raises(ConversionError, match="--names"):
    common.choose_rules(source, {"first": tables["first"], "same": tables["first"]}, what="toy")


def test_save_and_load_params_round_trip(tmp_path):
  params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4, np.float32)}
  out = common.save_params(params, tmp_path / "ckpt")
  restored = common.load_params(out)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  with pytest.raises(FileExistsError, match="--overwrite"):
    common.save_params(params, tmp_path / "ckpt")
  params["b"] = np.zeros(4, np.float32)
  common.save_params(params, tmp_path / "ckpt", overwrite=True)
  np.testing.assert_array_equal(common.load_params(tmp_path / "ckpt")["b"], 0.0)
