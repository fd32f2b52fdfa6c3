"""Text encoders: tokenizers, the learned encoder, MiniLM against a PyTorch reference, precomputed files."""

from __future__ import annotations

import json
import os
import string
import unicodedata
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from msjax.models import text


def _tiny_config(encoder: str = "learned"):
  config = presets.tiny()
  config.text.encoder = encoder
  return config


# ----------------------------------------------------------------------------------------------------------------
# Word tokenizer (learned encoder)


def test_word_tokenizer_is_deterministic_and_pads():
  prompts = ["A Red circle, and a BLUE square!", "red circle blue square", ""]
  ids_a, mask_a = text.WordTokenizer()(prompts, 16)
  ids_b, mask_b = text.WordTokenizer()(prompts, 16)
  np.testing.assert_array_equal(ids_a, ids_b)
  np.testing.assert_array_equal(mask_a, mask_b)
  assert ids_a.dtype == np.int32 and ids_a.shape == (3, 16) and mask_a.dtype == bool
  # Case, punctuation and stop words do not matter.
  np.testing.assert_array_equal(ids_a[0], ids_a[1])
  tokenizer = text.WordTokenizer()
  assert np.all(ids_a[:, 0] == tokenizer.start_id)
  np.testing.assert_array_equal(mask_a.sum(1), [5, 5, 1])
  assert np.all(ids_a[~mask_a] == tokenizer.pad_id)
  assert np.all(ids_a[mask_a] != tokenizer.pad_id)
  # Mask is a prefix.
  assert np.all(np.diff(mask_a.astype(int), axis=1) <= 0)


def test_word_tokenizer_unknown_words_get_stable_buckets():
  tokenizer = text.WordTokenizer()
  unknown = [f"zorblax{i}" for i in range(20)]
  ids, _ = tokenizer([" ".join(unknown)], 1 + len(unknown))
  ids_again, _ = text.WordTokenizer()([" ".join(unknown)], 1 + len(unknown))
  np.testing.assert_array_equal(ids, ids_again)
  buckets = ids[0, 1:]
  low = tokenizer.first_unknown_id
  assert np.all((buckets >= low) & (buckets < low + tokenizer.num_unknown_buckets))
  assert len(set(buckets.tolist())) > 1, "unknown words should spread over buckets"
  known, _ = tokenizer(["red"], 2)
  assert known[0, 1] >= low + tokenizer.num_unknown_buckets
  assert np.all(ids < tokenizer.vocab_size)


def test_word_tokenizer_truncates_with_warning():
  tokenizer = text.WordTokenizer()
  words = ["red", "circle", "blue", "square", "green", "triangle", "grey", "background"]
  full, _ = tokenizer([" ".join(words)], 1 + len(words))
  with pytest.warns(text.TextTruncationWarning, match="dropped"):
    cut, mask = tokenizer([" ".join(words)], 5)
  assert cut.shape == (1, 5) and mask.all()
  np.testing.assert_array_equal(cut[0], full[0, :5])


def test_sprites_prompts_fit_the_learned_vocabulary():
  sprites = pytest.importorskip("msjax.data.sprites")
  tokenizer = text.WordTokenizer()
  names = list(sprites.SPRITE_COLORS) + list(sprites.BACKGROUND_COLORS) + list(sprites.SHAPES)
  missing = [n for n in names if n not in tokenizer.words]
  assert not missing, f"sprites words missing from text.TOY_WORDS: {missing}"
  config = sprites.SpritesConfig(num_frames=5, effect_prob=1.0, min_sprites=3, max_sprites=3)
  prompts = [sprites.render_clip(seed, config).prompt for seed in range(12)]
  first_word_id = tokenizer.first_unknown_id + tokenizer.num_unknown_buckets
  with warnings.catch_warnings():
    warnings.simplefilter("error", text.TextTruncationWarning)  # the longest prompts must fit the tiny preset
    ids, mask = tokenizer(prompts, presets.tiny().model.text_len)
  assert np.all(ids[mask][ids[mask] != tokenizer.start_id] >= first_word_id), prompts


# ----------------------------------------------------------------------------------------------------------------
# Learned encoder


def test_learned_encoder_shapes_padding_null_and_gradients():
  config = _tiny_config()
  encoder = text.make_text_encoder(config)
  assert isinstance(encoder, text.LearnedTextEncoder) and encoder.trainable
  params = encoder.init_params(jax.random.key(0))
  prompts = ["a red circle on a grey background", "a blue square and a green triangle; the background darkens"]
  context, mask = encoder.encode(params, prompts)
  length, width = config.model.text_len, config.model.text_dim
  chex.assert_shape(context, (2, length, width))
  chex.assert_type(context, jnp.float32)
  chex.assert_shape(mask, (2, length))
  assert mask.dtype == jnp.bool_
  assert np.all(np.asarray(context)[~np.asarray(mask)] == 0.0), "padding rows must be exactly zero"
  assert np.all(np.abs(np.asarray(context)[np.asarray(mask)]).sum(-1) > 0)
  assert not np.allclose(context[0, 1], context[1, 1])

  null, null_mask = encoder.null_context(params)
  chex.assert_shape(null, (1, length, width))
  assert int(null_mask.sum()) == 1 and np.abs(np.asarray(null[0, 0])).sum() > 0

  inputs = encoder.prepare(prompts)

  def loss(p):
    return jnp.sum(encoder.apply(p, inputs)[0] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(value, jnp.sum(context ** 2), rtol=1e-5)
  for name in ("token_embed", "layers", "project"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[name])) > 0, name


def test_prepare_accepts_pipeline_arrays_and_rejects_a_bare_string():
  encoder = text.make_text_encoder(_tiny_config())
  as_list = encoder.prepare(["a red circle", "a cyan square"])
  as_bytes = encoder.prepare(np.array([b"a red circle", b"a cyan square"]))
  as_unicode = encoder.prepare(np.array(["a red circle", "a cyan square"]))
  np.testing.assert_array_equal(as_list.ids, as_bytes.ids)
  np.testing.assert_array_equal(as_list.ids, as_unicode.ids)
  with pytest.raises(text.TextEncoderError, match="single str"):
    encoder.prepare("a red circle")
  with pytest.raises(text.TextEncoderError, match="1-D"):
    encoder.prepare(np.array([["a"], ["b"]]))


def test_learned_encoder_needs_an_rng():
  with pytest.raises(text.TextEncoderError, match="rng"):
    text.make_text_encoder(_tiny_config()).init_params()


# ----------------------------------------------------------------------------------------------------------------
# WordPiece tokenizer (MiniLM)

_SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "hello", "world", "cafe",
                ",", "!", "a", "##b", "##c", "東", "京", "red", "circle"] + list(string.ascii_lowercase)


def test_wordpiece_pieces_rebuild_the_normalized_words():
  tokenizer = text.WordPieceTokenizer(_SMALL_VOCAB)
  prompt = "Unaffable, HELLO\tworld! Café 東京 abc"
  words = tokenizer.split(prompt)
  assert words == ["unaffable", ",", "hello", "world", "!", "cafe", "東", "京", "abc"]
  ids, mask = tokenizer([prompt], 32)
  inverse = {i: t for t, i in tokenizer.vocab.items()}
  pieces = [inverse[i] for i in ids[0][mask[0]]]
  assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
  rebuilt = " ".join(pieces[1:-1]).replace(" ##", "")
  assert rebuilt.split() == words
  assert len(pieces) > len(words) + 2, "unaffable should split into several pieces"
  assert np.all(ids[0][~mask[0]] == tokenizer.pad_id)


def test_wordpiece_unknown_and_truncation():
  tokenizer = text.WordPieceTokenizer(_SMALL_VOCAB)
  ids, mask = tokenizer(["hello zzq😀 " + "a" * 101], 8)
  unk = tokenizer.unk_id
  assert ids[0, 1] == tokenizer.vocab["hello"]
  # "zzq😀" has no cover for the emoji: the whole word is one [UNK]; a word over 100 characters too.
  np.testing.assert_array_equal(ids[0, 2:4], [unk, unk])
  assert int(mask.sum()) == 5
  with pytest.warns(text.TextTruncationWarning):
    cut, cut_mask = tokenizer(["red circle red circle red circle"], 5)
  assert cut_mask.all() and cut[0, 0] == tokenizer.cls_id and cut[0, -1] == tokenizer.sep_id


def _minilm_dir() -> str:
  try:
    return text.minilm_dir()
  except text.TextEncoderError as e:
    pytest.skip(f"MiniLM weights not installed ({e})")


@pytest.fixture(scope="module")
def minilm():
  """(encoder, params) for the tiny preset with the pretrained MiniLM, loaded once for this file."""
  _minilm_dir()
  encoder = text.make_text_encoder(_tiny_config("minilm"))
  return encoder, encoder.init_params()


@pytest.mark.parity
def test_wordpiece_matches_hf_tokenizers():
  tokenizers = pytest.importorskip("tokenizers", reason="optional reference: pip install tokenizers")
  model_dir = _minilm_dir()
  reference = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
  reference.no_padding()
  reference.no_truncation()
  mine = text.WordPieceTokenizer.from_vocab_file(os.path.join(model_dir, "vocab.txt"))
  rng = np.random.default_rng(0)
  # Scripts whose Unicode properties have been stable for decades (newer characters' categories differ between
  # Python's and the Rust crate's Unicode tables).
  alphabet = [chr(c) for r in ((32, 127), (0xA0, 0x250), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4E80),
                               (0x3040, 0x30FF), (0x2000, 0x206F)) for c in range(*r)
              if unicodedata.ucd_3_2_0.category(chr(c)) != "Cn"]
  prompts = ["Hello, world! Café naïve 東京 unaffable", "don't stop—believing…", "3.14 $100 #tag a+b=c",
             "tabs\tand\nnewlines\r\n", "x" * 120, "emoji 😀 here", ""]
  prompts += ["".join(rng.choice(alphabet, rng.integers(1, 40))) for _ in range(2000)]
  for prompt in prompts:
    ids, mask = mine([prompt], 512)
    assert ids[0][mask[0]].tolist() == reference.encode(prompt).ids, repr(prompt)


# ----------------------------------------------------------------------------------------------------------------
# BERT / MiniLM against a PyTorch reference written from the checkpoint's own layout


def _torch_bert(weights: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, num_layers: int, num_heads: int,
                eps: float) -> np.ndarray:
  """Hugging Face BertModel's last hidden state in float64 torch, zeroed on padding rows."""
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  w = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in weights.items() if v.dtype.kind == "f"}
  ids_t = torch.from_numpy(ids.astype(np.int64))
  keep = torch.from_numpy(mask)
  batch, length = ids.shape
  width = w["embeddings.word_embeddings.weight"].shape[1]
  head_dim = width // num_heads

  def norm(x, prefix):
    return functional.layer_norm(x, (width,), w[prefix + ".weight"], w[prefix + ".bias"], eps)

  def linear(x, prefix):
    return functional.linear(x, w[prefix + ".weight"], w[prefix + ".bias"])

  def heads(x):
    return x.view(batch, length, num_heads, head_dim).transpose(1, 2)

  x = (w["embeddings.word_embeddings.weight"][ids_t] + w["embeddings.position_embeddings.weight"][:length][None]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = norm(x, "embeddings.LayerNorm")
  bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
  bias = bias[:, None, None, :]
  for i in range(num_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (heads(linear(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    probs = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5 + bias, dim=-1)
    attended = (probs @ v).transpose(1, 2).reshape(batch, length, width)
    x = norm(x + linear(attended, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    hidden = functional.gelu(linear(x, p + "intermediate.dense"))
    x = norm(x + linear(hidden, p + "output.dense"), p + "output.LayerNorm")
  return (x * keep[..., None]).numpy()


def _relative_error(found: np.ndarray, expected: np.ndarray) -> float:
  return float(np.abs(found - expected).max() / np.abs(expected).max())


def _random_bert_dir(path, *, width=32, num_layers=2, num_heads=4, mlp_dim=64, max_positions=24, seed=0):
  """A Hugging Face style BERT folder (config.json, model.safetensors, vocab.txt) with random weights."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  vocab = _SMALL_VOCAB
  shapes = {"embeddings.word_embeddings.weight": (len(vocab), width),
            "embeddings.position_embeddings.weight": (max_positions, width),
            "embeddings.token_type_embeddings.weight": (2, width),
            "embeddings.LayerNorm.weight": (width,), "embeddings.LayerNorm.bias": (width,),
            "pooler.dense.weight": (width, width), "pooler.dense.bias": (width,)}
  for i in range(num_layers):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      shapes[p + f"attention.self.{name}.weight"] = (width, width)
      shapes[p + f"attention.self.{name}.bias"] = (width,)
    shapes.update({p + "attention.output.dense.weight": (width, width), p + "attention.output.dense.bias": (width,),
                   p + "attention.output.LayerNorm.weight": (width,), p + "attention.output.LayerNorm.bias": (width,),
                   p + "intermediate.dense.weight": (mlp_dim, width), p + "intermediate.dense.bias": (mlp_dim,),
                   p + "output.dense.weight": (width, mlp_dim), p + "output.dense.bias": (width,),
                   p + "output.LayerNorm.weight": (width,), p + "output.LayerNorm.bias": (width,)})
  weights = {k: (rng.normal(size=s) * (0.3 if len(s) > 1 else 0.1)).astype(np.float32) for k, s in shapes.items()}
  for k in weights:
    if "LayerNorm.weight" in k:
      weights[k] += 1.0
  safetensors.numpy.save_file(weights, os.path.join(path, "model.safetensors"))
  hf_config = {"hidden_act": "gelu", "position_embedding_type": "absolute", "vocab_size": len(vocab),
               "max_position_embeddings": max_positions, "type_vocab_size": 2, "hidden_size": width,
               "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "intermediate_size": mlp_dim,
               "layer_norm_eps": 1e-12}
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f)
  with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  return weights, hf_config


@pytest.mark.parity
def test_random_bert_matches_torch_reference(tmp_path):
  weights, hf = _random_bert_dir(tmp_path)
  encoder = text.MiniLMTextEncoder(text_len=12, text_dim=hf["hidden_size"], model_dir=tmp_path)
  params = encoder.init_params()
  inputs = encoder.prepare(["hello world", "unaffable red circle, a b c!", ""])
  context, mask = encoder.apply(params, inputs)
  expected = _torch_bert(weights, inputs.ids, inputs.mask, hf["num_hidden_layers"], hf["num_attention_heads"],
                         hf["layer_norm_eps"])
  np.testing.assert_array_equal(mask, inputs.mask)
  assert _relative_error(np.asarray(context), expected) <= 1e-4


@pytest.mark.parity
def test_minilm_matches_torch_reference(minilm):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  model_dir = _minilm_dir()
  config = _tiny_config("minilm")
  encoder, params = minilm
  assert not encoder.trainable
  prompts = ["a red circle and a blue square on a grey background; the background slowly darkens",
             "Unaffable café owners in 東京!", ""]
  with pytest.warns(text.TextTruncationWarning):  # the first prompt is cut, [SEP] stays last
    inputs = encoder.prepare(prompts)
  assert inputs.mask[0].all() and inputs.ids[0, -1] == encoder.tokenizer.sep_id
  context, mask = encoder.apply(params, inputs)
  chex.assert_shape(context, (3, config.model.text_len, config.model.text_dim))
  hf = json.load(open(os.path.join(model_dir, "config.json"), encoding="utf-8"))
  weights = safetensors.numpy.load_file(os.path.join(model_dir, "model.safetensors"))
  expected = _torch_bert(weights, inputs.ids, inputs.mask, hf["num_hidden_layers"], hf["num_attention_heads"],
                         hf["layer_norm_eps"])
  assert _relative_error(np.asarray(context), expected) <= 1e-4
  assert np.all(np.asarray(context)[~np.asarray(mask)] == 0.0)


def test_minilm_embeddings_are_semantic(minilm):
  encoder, params = minilm
  context, mask = encoder.encode(params, ["a red circle moves to the left", "a red disc moving left",
                                          "quarterly earnings beat analyst expectations"])
  pooled = np.asarray((context * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
  pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  similar, unrelated = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
  assert similar > unrelated + 0.3, (similar, unrelated)
  # Frozen: no gradient reaches the weights.
  grads = jax.grad(lambda p: jnp.sum(encoder.encode(p, ["a red circle"])[0]))(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_bert_checkpoint_errors_name_the_file(tmp_path):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from msjax.convert import common as convert_common  # pylint: disable=g-import-not-at-top
  weights, hf = _random_bert_dir(tmp_path)
  path = os.path.join(tmp_path, "model.safetensors")
  shape = text.BertShape.from_hf_config(os.path.join(tmp_path, "config.json"))
  broken = dict(weights)
  del broken["encoder.layer.1.output.dense.bias"]
  broken["encoder.layer.0.intermediate.dense.weight"] = np.zeros(
      (hf["intermediate_size"] + 1, hf["hidden_size"]), np.float32)
  with pytest.raises(text.TextEncoderError) as error:
    text.bert_params(convert_common.from_state_dict(broken, name=path), shape)
  message = str(error.value)
  assert path in message and "layers/mlp_out/bias (layers 1)" in message
  assert "encoder.layer.0.intermediate.dense.weight" in message and "65" in message
  prefixed = {"bert." + k: v for k, v in weights.items()}
  params = text.bert_params(convert_common.from_state_dict(prefixed), shape)
  np.testing.assert_array_equal(params["layers"]["mlp_in"]["kernel"][1],
                                weights["encoder.layer.1.intermediate.dense.weight"].T)
  safetensors.numpy.save_file(broken, path)
  with pytest.raises(text.TextEncoderError, match="model.safetensors"):
    text.MiniLMTextEncoder(12, hf["hidden_size"], model_dir=tmp_path).init_params()
  with pytest.raises(text.TextEncoderError, match="text_dim"):
    text.MiniLMTextEncoder(12, hf["hidden_size"] + 1, model_dir=tmp_path)
  with pytest.raises(text.TextEncoderError, match="config.json"):
    text.MiniLMTextEncoder(12, hf["hidden_size"], model_dir=tmp_path / "absent")


# ----------------------------------------------------------------------------------------------------------------
# Precomputed embeddings


def test_load_text_embedding_pads_truncates_and_masks(tmp_path):
  rng = np.random.default_rng(0)
  short = rng.normal(size=(5, 8)).astype(np.float32)
  np.save(tmp_path / "short.npy", short)
  embedding, mask = text.load_text_embedding(tmp_path / "short.npy", text_len=7, text_dim=8)
  assert embedding.shape == (7, 8) and embedding.dtype == np.float32
  np.testing.assert_array_equal(embedding[:5], short)
  assert np.all(embedding[5:] == 0)
  np.testing.assert_array_equal(mask, [True] * 5 + [False] * 2)

  long = rng.normal(size=(9, 8))
  np.save(tmp_path / "long.npy", long)
  with pytest.warns(text.TextTruncationWarning, match="long.npy"):
    embedding, mask = text.load_text_embedding(tmp_path / "long.npy", text_len=7, text_dim=8)
  np.testing.assert_allclose(embedding, long[:7].astype(np.float32))
  assert mask.all()


@pytest.mark.parametrize("array, message", [
    (np.zeros((1, 4, 8), np.float32), r"expected shape \[L, 8\].*\(1, 4, 8\).*array\[0\]"),
    (np.zeros((4, 6), np.float32), r"expected shape \[L, 8\].*\(4, 6\)"),
    (np.full((4, 8), np.nan, np.float32), "non-finite value at row 0"),
    (np.zeros((4, 8), np.int32), "float"),
])
def test_load_text_embedding_errors_name_the_file(tmp_path, array, message):
  path = tmp_path / "bad.npy"
  np.save(path, array)
  with pytest.raises(text.TextEncoderError, match=message) as error:
    text.load_text_embedding(path, text_len=7, text_dim=8)
  assert str(path) in str(error.value)


def test_load_text_embedding_unreadable_files(tmp_path):
  with pytest.raises(text.TextEncoderError, match="does not exist"):
    text.load_text_embedding(tmp_path / "absent.npy", 4, 8)
  garbage = tmp_path / "garbage.npy"
  garbage.write_bytes(b"not an npy file")
  with pytest.raises(text.TextEncoderError, match="garbage.npy"):
    text.load_text_embedding(garbage, 4, 8)


def test_precomputed_encoder_paths_and_null(tmp_path):
  config = presets.wan2_1_1_3b()
  config.model.text_len, config.model.text_dim = 6, 8  # small, same code path as 512 x 4096
  config.text.embedding_dir = str(tmp_path)
  rng = np.random.default_rng(1)
  prompt = rng.normal(size=(3, 8)).astype(np.float32)
  null = rng.normal(size=(2, 8)).astype(np.float32)
  np.save(tmp_path / "prompt.npy", prompt)
  np.save(tmp_path / "null.npy", null)

  encoder = text.make_text_encoder(config)
  assert isinstance(encoder, text.PrecomputedTextEncoder) and encoder.init_params() == {}
  context, mask = jax.jit(encoder.apply)({}, encoder.prepare(["prompt.npy", ""]))
  chex.assert_shape(context, (2, 6, 8))
  np.testing.assert_array_equal(context[0, :3], prompt)
  assert np.all(np.asarray(context[1]) == 0) and not np.asarray(mask[1]).any()

  config.text.null_embedding = "null.npy"
  null_context, null_mask = text.make_text_encoder(config).null_context({})
  np.testing.assert_array_equal(null_context[0, :2], null)
  np.testing.assert_array_equal(null_mask[0], [True] * 2 + [False] * 4)


def test_make_text_encoder_reads_optional_sizes():
  config = _tiny_config()
  config.text.width, config.text.num_layers = 64, 1
  encoder = text.make_text_encoder(config)
  assert encoder.shape.width == 64 and encoder.shape.num_layers == 1
  shapes = jax.eval_shape(encoder.init_params, jax.random.key(0))
  assert shapes["project"]["kernel"].shape == (64, config.model.text_dim)
  assert shapes["layers"]["mlp_in"]["kernel"].shape[0] == 1


def test_make_text_encoder_rejects_unknown_names():
  config = _tiny_config("clip")
  with pytest.raises(text.TextEncoderError, match="learned, minilm, precomputed"):
    text.make_text_encoder(config)
