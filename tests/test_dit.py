"""WanDiT: shapes and dtypes, the parameter-tree contract, per-frame timesteps, masks, track head, conditioning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from msjax import config_utils
from msjax.models import attention
from msjax.models import dit
from msjax.models import track_head
import dit_fixtures


def test_tiny_preset_bidirectional_forward_shapes_and_dtypes():
  config = models.tiny()
  geo = config_utils.geometry(config)
  b = 2
  latents = jax.ShapeDtypeStruct((b, geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels),
                                 jnp.float32)
  t = jax.ShapeDtypeStruct((b, geo.latent_frames), jnp.float32)
  cond = track_head.Conditioning(
      context=jax.ShapeDtypeStruct((b, config.model.text_len, config.model.text_dim), jnp.float32),
      first_latent=jax.ShapeDtypeStruct((b, geo.latent_height, geo.latent_width, geo.latent_channels), jnp.float32),
      track_grid=jax.ShapeDtypeStruct((b, geo.num_frames, geo.latent_height, geo.latent_width,
                                       config.tracks.embed_dim), jnp.float32))
  model = dit.WanDiT(dit.DiTSpec.from_config(config))
  variables = jax.eval_shape(model.init, jax.random.key(0), latents, t, cond)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  out = jax.eval_shape(model.apply, variables, latents, t, cond)
  assert (out.shape, out.dtype) == (latents.shape, jnp.float32)


def test_small_forward_is_finite_and_bf16_keeps_float32_output():
  config, model, params, latents, cond = dit_fixtures.small_setup()
  t = jnp.linspace(0.0, 1.0, latents.shape[1])[None]
  out = jax.jit(model.apply)({"params": params}, latents, t, cond)
  chex.assert_shape(out, latents.shape)
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  assert float(jnp.abs(out).max()) > 0.0
  config.model.dtype = "bfloat16"
  low = dit.WanDiT(dit.DiTSpec.from_config(config))
  out_bf16 = jax.jit(low.apply)({"params": params}, latents, t, cond)
  chex.assert_type(out_bf16, jnp.float32)
  rel = float(jnp.linalg.norm(out_bf16 - out) / jnp.linalg.norm(out))
  assert rel < 0.05, rel


def _expected_shapes(config):
  """The parameter tree of the converter contract, derived from the config."""
  m = config.model
  geo = config_utils.geometry(config)
  d, n, f = m.dim, m.num_layers, m.ffn_dim
  pt, ph, pw = m.patch_size

  def dense(i, o, layers=None):
    lead = () if layers is None else (layers,)
    return {"kernel": lead + (i, o), "bias": lead + (o,)}

  attn = {name: dense(d, d, n) for name in ("q", "k", "v", "o")}
  attn.update(norm_q={"scale": (n, d)}, norm_k={"scale": (n, d)})
  cross = dict(attn)
  if m.image_cross_attn:
    cross.update(k_img=dense(d, d, n), v_img=dense(d, d, n), norm_k_img={"scale": (n, d)})
  tree = {
      "patch_embedding": {"kernel": (pt, ph, pw, geo.in_channels, d), "bias": (d,)},
      "text_embedding": {"fc1": dense(m.text_dim, d), "fc2": dense(d, d)},
      "time_embedding": {"fc1": dense(m.freq_dim, d), "fc2": dense(d, d)},
      "time_projection": dense(d, 6 * d),
      "blocks": {"modulation": (n, 6, d), "self_attn": attn, "norm3": {"scale": (n, d), "bias": (n, d)},
                 "cross_attn": cross, "ffn": {"fc1": dense(d, f, n), "fc2": dense(f, d, n)}},
      "head": {"modulation": (2, d), "linear": dense(d, pt * ph * pw * geo.latent_channels)},
  }
  if m.image_cross_attn:
    e = m.image_embed_dim
    tree["image_embedding"] = {"norm_in": {"scale": (e,), "bias": (e,)}, "fc1": dense(e, e), "fc2": dense(e, d),
                               "norm_out": {"scale": (d,), "bias": (d,)}}
  return tree


@pytest.mark.parametrize("image_cross_attn", [False, True])
def test_wan_1_3b_param_tree_matches_converter_contract(image_cross_attn):
  config = models.wan2_1_1_3b()
  config.model.attention = "xla"  # eval_shape on a CPU host; the kernel choice does not change parameters
  config.model.image_cross_attn = image_cross_attn
  geo = config_utils.geometry(config)
  spec = dit.DiTSpec.from_config(config)
  b, c = 1, config.stream.chunk_frames
  latents = jax.ShapeDtypeStruct((b, c, geo.latent_height, geo.latent_width, geo.latent_channels), jnp.float32)
  cond = track_head.Conditioning(
      context=jax.ShapeDtypeStruct((b, config.model.text_len, config.model.text_dim), jnp.float32),
      image_tokens=(jax.ShapeDtypeStruct((b, config.model.image_tokens, config.model.image_embed_dim), jnp.float32)
                    if image_cross_attn else None))
  variables = jax.eval_shape(dit.WanDiT(spec).init, jax.random.key(0), latents,
                             jax.ShapeDtypeStruct((b, c), jnp.float32), cond)
  params = dict(variables["params"])
  assert "track_head" in params  # msjax-only and free-form: only its presence is part of the contract
  del params["track_head"]
  got = jax.tree.map(lambda leaf: leaf.shape, params)
  assert got == _expected_shapes(config)
  # Wan 2.1 T2V 1.3B has 1,418,996,800 parameters with 16 input channels (wan.md 1.6): the contract adds only
  # the extra patch-embedding input rows (and the CLIP branch when enabled).
  extra_inputs = (geo.in_channels - geo.latent_channels) * spec.patch_volume * spec.dim
  wan_t2v = sum(np.prod(s) for s in jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, tuple))) - extra_inputs
  if not image_cross_attn:
    assert wan_t2v == 1_418_996_800


def test_per_frame_timestep_changes_only_its_frame():
  """With attention restricted to each frame itself, changing frame j's t changes exactly frame j's output:
  the time modulation of the blocks and the head is per latent frame."""
  config, model, params, latents, cond = dit_fixtures.small_setup()
  frames = latents.shape[1]
  geo = config_utils.geometry(config)
  own_frame = attention.expand_chunk_mask(attention.block_causal_chunk_mask(frames, 0, 0), geo.tokens_per_frame)
  apply = jax.jit(lambda t: model.apply({"params": params}, latents, t, cond, mask=own_frame))
  t = jnp.full((1, frames), 0.5)
  changed_frame = 4
  base, moved = apply(t), apply(t.at[:, changed_frame].set(0.9))
  diff = np.asarray(jnp.abs(base - moved).max(axis=(0, 2, 3, 4)))
  assert diff[changed_frame] > 1e-3
  np.testing.assert_array_equal(np.delete(diff, changed_frame), 0.0)


def test_block_causal_mask_pattern():
  num_chunks, sink, window = 6, 1, 2
  got = np.asarray(attention.block_causal_chunk_mask(num_chunks, sink, window))
  for i in range(num_chunks):
    visible = set(range(min(sink, i + 1))) | set(range(max(sink, i - window), i)) | {i}
    assert set(np.flatnonzero(got[i])) == visible, i
  # e.g. chunk 4 sees the sink (0), the window (2, 3) and itself, but not 1.
  assert np.flatnonzero(got[4]).tolist() == [0, 2, 3, 4]
  causal = np.asarray(attention.block_causal_chunk_mask(num_chunks, 0, num_chunks))
  np.testing.assert_array_equal(causal, np.tril(np.ones((num_chunks, num_chunks), bool)))
  tokens = np.asarray(attention.expand_chunk_mask(jnp.asarray(got), 3))
  assert tokens.shape == (18, 18) and tokens[13, 7] and not tokens[13, 4]  # token 13 in chunk 4, 7 in 2, 4 in 1
  # traced sink / window (diverse masks inside one compiled step)
  traced = jax.jit(attention.block_causal_chunk_mask, static_argnums=0)(num_chunks, sink, window)
  np.testing.assert_array_equal(np.asarray(traced), got)


def test_attend_valid_keys_equals_truncated_keys_and_kernel_names():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(3))
  full_k = jnp.concatenate([k, 100.0 * jnp.ones_like(k)], axis=1)
  full_v = jnp.concatenate([v, 100.0 * jnp.ones_like(v)], axis=1)
  got = attention.attend(q, full_k, full_v, implementation=None, valid_keys=jnp.int32(5))
  np.testing.assert_allclose(got, attention.attend(q, k, v, implementation=None), atol=1e-6)
  assert attention.implementation_for("xla") is None
  assert attention.implementation_for("cudnn") == "cudnn"
  with pytest.raises(ValueError, match="model.attention"):
    attention.implementation_for("flash")


@pytest.mark.parametrize("masking", ["none", "mask", "valid_keys", "both", "empty_row", "key_mask"])
def test_xla_kernel_matches_jax_nn_attention_and_its_derivatives(masking):
  """attend(implementation=None) is our deferred-normalisation kernel: values, reverse- and forward-mode
  derivatives agree with jax.nn.dot_product_attention's XLA path under every masking the DiT uses."""
  rng = np.random.default_rng(1)
  batch, nq, nk, heads, head_dim = 2, 6, 9, 3, 8
  q = jnp.asarray(rng.standard_normal((batch, nq, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((batch, nk, heads, head_dim)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((nq, nk)) < 0.6).at[:, 0].set(True) if masking in ("mask", "both") else None
  if masking == "empty_row":
    mask = jnp.ones((nq, nk), bool).at[2].set(False)
  valid = jnp.int32(5) if masking in ("valid_keys", "both") else None
  # per-row key masks, as for padded prompts in the text encoder: row 0 sees 4 keys, row 1 every other one
  key_mask = jnp.stack([jnp.arange(nk) < 4, jnp.arange(nk) % 2 == 0]) if masking == "key_mask" else None

  def ours(q, k, v):
    return attention.attend(q, k, v, implementation=None, mask=mask, valid_keys=valid, key_mask=key_mask)

  def library(q, k, v):
    lengths = None if valid is None else jnp.full((batch,), valid)
    library_mask = None if mask is None else mask[None, None]
    if key_mask is not None:
      library_mask = key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=library_mask, key_value_seq_lengths=lengths)

  got, want = ours(q, k, v), library(q, k, v)
  chex.assert_shape(got, q.shape)
  np.testing.assert_allclose(got, want, atol=2e-6)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  got_grads = jax.vjp(ours, q, k, v)[1](cotangent)
  want_grads = jax.vjp(library, q, k, v)[1](cotangent)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5)
  tangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k, v))
  np.testing.assert_allclose(jax.jvp(ours, (q, k, v), tangents)[1], jax.jvp(library, (q, k, v), tangents)[1],
                             atol=2e-5)
  if masking == "valid_keys":  # keys past the prefix get no gradient
    assert float(jnp.abs(got_grads[1][:, 5:]).max()) == 0.0
  if masking == "key_mask":
    assert float(jnp.abs(got_grads[1][0, 4:]).max()) == 0.0 and float(jnp.abs(got_grads[1][1, 1::2]).max()) == 0.0
    with pytest.raises(ValueError, match="not both"):
      attention.attend(q, k, v, implementation=None, mask=jnp.ones((nq, nk), bool), key_mask=key_mask)


def test_xla_kernel_in_bfloat16_keeps_float32_softmax():
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 7, 2, 16)), jnp.bfloat16) for _ in range(3))
  got = attention.attend(q, k, v, implementation=None)
  assert got.dtype == jnp.bfloat16
  exact = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(np.asarray(got, np.float32), exact, atol=3e-2)


def test_track_head_is_chunkwise():
  """A chunk's track features depend only on its own pixel frames, and the first pixel frame stands alone."""
  config, _, _, latents, cond = dit_fixtures.small_setup()
  head = track_head.TrackHead(config.tracks.embed_dim, config.codec.temporal_stride, config.model.track_channels)
  variables = head.init(jax.random.key(5), cond.track_grid)
  apply = jax.jit(head.apply)
  whole = apply(variables, cond.track_grid)
  chex.assert_shape(whole, latents.shape[:4] + (config.model.track_channels,))
  c = config.stream.chunk_frames
  stride = config.codec.temporal_stride
  for chunk in range(latents.shape[1] // c):
    grid = dit_fixtures.chunk_track_grid(cond.track_grid, chunk, c, stride)
    np.testing.assert_allclose(apply(variables, grid), whole[:, chunk * c:(chunk + 1) * c], atol=1e-6)
  # latent frame 0 reads only pixel frame 0 (repeated), latent frame 1 reads pixel frames 1..stride
  bumped = cond.track_grid.at[:, stride].add(1.0)
  delta = np.asarray(jnp.abs(apply(variables, bumped) - whole).max(axis=(0, 2, 3, 4)))
  assert delta[0] == 0.0 and delta[1] > 0.0 and np.all(delta[2:] == 0.0)
  with pytest.raises(ValueError, match="track grid has"):
    apply(variables, cond.track_grid[:, :6])


def test_track_input_scale_is_a_factor_on_the_grid():
  """model.track_input_scale acts as if every ID embedding were that much larger (same parameters)."""
  config, _, _, _, cond = dit_fixtures.small_setup()
  dims = (config.tracks.embed_dim, config.codec.temporal_stride, config.model.track_channels)
  plain = track_head.TrackHead(*dims)
  scaled = track_head.TrackHead(*dims, input_scale=4.0)
  variables = plain.init(jax.random.key(5), cond.track_grid)
  np.testing.assert_allclose(scaled.apply(variables, cond.track_grid), plain.apply(variables, 4.0 * cond.track_grid),
                             rtol=1e-5, atol=1e-6)
  assert dit.DiTSpec.from_config(config).track_input_scale == config.model.track_input_scale
  config.model.track_input_scale = 0.0
  with pytest.raises(config_utils.ConfigError, match="track_input_scale"):
    dit.DiTSpec.from_config(config)


def test_nearest_offset_head_starts_as_the_nearest_head_and_learns_the_offsets():
  """tracks.splat nearest_offset adds one zero-initialised input (offset_in): a nearest head's params with it
  compute what they computed without the offsets, and the gradient reaches it."""
  config, _, _, latents, cond = dit_fixtures.small_setup()
  dims = (config.tracks.embed_dim, config.codec.temporal_stride, config.model.track_channels)
  nearest = track_head.TrackHead(*dims, input_scale=4.0)
  with_offsets = track_head.TrackHead(*dims, input_scale=4.0, offset_channels=config_utils.TRACK_OFFSET_CHANNELS)
  offsets = jax.random.uniform(jax.random.key(2), cond.track_grid.shape[:-1] + (config_utils.TRACK_OFFSET_CHANNELS,),
                               minval=-1.0, maxval=1.0)
  grid = jnp.concatenate([cond.track_grid, offsets], axis=-1)
  params = nearest.init(jax.random.key(5), cond.track_grid)["params"]
  fresh = with_offsets.init(jax.random.key(6), grid)["params"]
  assert set(fresh) - set(params) == {track_head.OFFSET_INPUT}
  assert not np.asarray(fresh[track_head.OFFSET_INPUT]["kernel"]).any()
  grown = dict(params, **{track_head.OFFSET_INPUT: fresh[track_head.OFFSET_INPUT]})
  np.testing.assert_allclose(with_offsets.apply({"params": grown}, grid), nearest.apply({"params": params},
                                                                                        cond.track_grid), atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(with_offsets.apply({"params": p}, grid) ** 2))(grown)
  assert float(jnp.abs(grads[track_head.OFFSET_INPUT]["kernel"]).max()) > 1e-3
  moved = dict(grown, **{track_head.OFFSET_INPUT: jax.tree.map(lambda g: -g, grads[track_head.OFFSET_INPUT])})
  change = with_offsets.apply({"params": moved}, grid) - with_offsets.apply({"params": grown}, grid)
  assert float(jnp.abs(change).max()) > 1e-3
  with pytest.raises(AssertionError):  # a grid without the offset channels is refused
    with_offsets.apply({"params": grown}, cond.track_grid)
  config.tracks.splat = "nearest_offset"
  assert dit.DiTSpec.from_config(config).track_offset_channels == config_utils.TRACK_OFFSET_CHANNELS
  example_grid = dit.example_inputs(config, 1)[2].track_grid
  assert example_grid.shape[-1] == config.tracks.embed_dim + config_utils.TRACK_OFFSET_CHANNELS


def test_image_condition_channels():
  b, f, h, w, c, m = 2, 3, 4, 4, 5, 4
  first = jnp.arange(b * h * w * c, dtype=jnp.float32).reshape(b, h, w, c) + 1.0
  got = track_head.image_condition_channels(first, b, f, h, w, c, m, frame_start=0)
  chex.assert_shape(got, (b, f, h, w, m + c))
  np.testing.assert_array_equal(got[:, 0, ..., :m], 1.0)
  np.testing.assert_array_equal(got[:, 0, ..., m:], first)
  np.testing.assert_array_equal(got[:, 1:], 0.0)
  later = track_head.image_condition_channels(first, b, f, h, w, c, m, frame_start=jnp.int32(3))
  np.testing.assert_array_equal(later, 0.0)


def test_conditioning_changes_output_and_bad_inputs_raise():
  config, model, params, latents, cond = dit_fixtures.small_setup()
  t = jnp.full(latents.shape[:2], 0.4)
  apply = jax.jit(lambda c: model.apply({"params": params}, latents, t, c))
  base = apply(cond)
  for changed in (cond.replace(track_grid=None, first_latent=None), cond.replace(context=cond.context + 1.0),
                  cond.replace(track_grid=cond.track_grid.at[:, 5:].set(0.0))):
    assert float(jnp.abs(apply(changed) - base).max()) > 1e-4
  with pytest.raises(ValueError, match="context"):
    apply(cond.replace(context=None))
  with pytest.raises(ValueError, match="image_tokens"):
    apply(cond.replace(image_tokens=jnp.zeros((1, 4, config.model.image_embed_dim))))
  with pytest.raises(ValueError, match="latent frames"):
    apply(cond.replace(track_grid=cond.track_grid[:, :9]))


def test_remat_and_unrolled_layers_match_scan():
  config, model, params, latents, cond = dit_fixtures.small_setup()
  t = jnp.full(latents.shape[:2], 0.3)
  config.model.remat = True
  config.model.scan_layers = False
  other = dit.WanDiT(dit.DiTSpec.from_config(config))
  base = jax.jit(model.apply)({"params": params}, latents, t, cond)
  np.testing.assert_allclose(jax.jit(other.apply)({"params": params}, latents, t, cond), base, atol=1e-5)


@pytest.mark.slow
def test_remat_gradients_match():
  config, model, params, latents, cond = dit_fixtures.small_setup()
  t = jnp.full(latents.shape[:2], 0.3)
  config.model.remat = True
  other = dit.WanDiT(dit.DiTSpec.from_config(config))
  loss = lambda p, m: jnp.mean(m.apply({"params": p}, latents, t, cond) ** 2)
  grads = jax.jit(jax.grad(loss), static_argnums=1)(params, model), jax.jit(jax.grad(loss), static_argnums=1)(
      params, other)
  chex.assert_trees_all_close(*grads, atol=1e-5)


def test_x0_head_is_turned_into_the_flow_velocity():
  """With model.prediction = 'x0' the head's output h gives v = (z_t - h) / max(t, x0_min_t), per frame."""
  config = dit_fixtures.small_config()
  config.model.prediction = "velocity"
  velocity_model = dit.WanDiT(dit.DiTSpec.from_config(config))
  config.model.prediction = "x0"
  x0_model = dit.WanDiT(dit.DiTSpec.from_config(config))
  latents, _, cond = dit.example_inputs(config, 2)
  latents = jax.random.normal(jax.random.PRNGKey(1), latents.shape)
  params = velocity_model.init(jax.random.PRNGKey(0), latents, jnp.zeros((2,)), cond)["params"]
  # The head starts at zero; move every parameter so the head's output is not trivially 0.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  frames = latents.shape[1]
  t = jnp.tile(jnp.linspace(0.0, 0.9, frames)[None], (2, 1))  # includes t = 0, clamped to x0_min_t
  head = velocity_model.apply({"params": params}, latents, t, cond)
  v = x0_model.apply({"params": params}, latents, t, cond)
  expected = (latents - head) / jnp.maximum(t, config.model.x0_min_t)[:, :, None, None, None]
  np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-5)
  config.model.prediction = "eps"
  with pytest.raises(ValueError, match="model.prediction"):
    dit.DiTSpec.from_config(config)
