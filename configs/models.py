"""Model presets: every shape in msjax derives from one of these ConfigDicts.

A preset bundles what must agree across the system: the video size, the codec that maps video to latents,
the DiT that denoises those latents, the track conditioning, the text width and the streaming cache.
Derived numbers (latent grid, tokens per latent frame, input channels) are computed by helpers in
`msjax.config_utils`, never written down twice.

Presets:
  tiny         the toy world (`sprites`, 64x64, `pack` codec): trains and streams on a 2-core CPU.
  wan2_1_1_3b  Wan 2.1 1.3B at 832x480 (numbers: ../shared/reference/wan.md section 1).
  wan2_2_5b    Wan 2.2 TI2V 5B at 1280x704 (paper.md section 1.2).
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "wan2_1_1_3b", "wan2_2_5b")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = ""

  # Pixel-space video.
  c.video = ml_collections.ConfigDict()
  c.video.height = 0
  c.video.width = 0
  c.video.num_frames = 0  # 1 + 4k, like Wan: the first latent frame holds frame 0 alone.
  c.video.fps = 16

  # Video <-> latent codec.
  c.codec = ml_collections.ConfigDict()
  c.codec.name = "pack"  # pack | wan | taehv
  c.codec.temporal_stride = 4
  c.codec.spatial_stride = 4
  c.codec.latent_channels = 0

  # The DiT (teacher, critic and student share it).
  c.model = ml_collections.ConfigDict()
  c.model.dim = 0
  c.model.num_layers = 0
  c.model.num_heads = 0
  c.model.ffn_dim = 0
  c.model.freq_dim = 256
  c.model.patch_size = (1, 2, 2)
  c.model.eps = 1e-6
  c.model.qk_norm = True
  c.model.cross_attn_norm = True
  c.model.rope_theta = 10000.0
  c.model.rope_max_positions = 1024
  # Conditioning channels concatenated to the noisy latent before patch embedding, in this order:
  # [noisy latent | image mask (mask_channels) | first-frame latent (latent_channels) | track features].
  # 'concat' is Wan 2.1 I2V; 'none' is T2V (no image channels); 'replace' is Wan 2.2 TI2V (clean first latent).
  c.model.image_condition = "concat"
  c.model.mask_channels = 4  # = codec temporal stride in Wan 2.1 I2V
  # Optional Wan 2.1 I2V CLIP image cross-attention branch (img_emb + k_img/v_img).
  c.model.image_cross_attn = False
  c.model.image_embed_dim = 1280
  c.model.image_tokens = 257
  # Text context: `text_len` tokens of width `text_dim` (zero padded, attended unmasked like Wan).
  c.model.text_dim = 0
  c.model.text_len = 0
  # Track head output channels (0 disables tracks: a plain Wan DiT).
  c.model.track_channels = 0
  # Factor on the rasterised track grid as the track head reads it (the same as scaling every ID embedding
  # phi_n). The paper's phi_n have unit amplitude; that suits a backbone whose patch vector is small next to
  # model.dim (Wan: 64 latent values into 1536). Where the noisy patch vector is wider than the residual stream
  # (the toy: 768 into 256), noise fills every direction of it and unit-amplitude IDs are too faint for the
  # attention to match: see docs/teacher_ids.md for the measurement behind a value > 1.
  c.model.track_input_scale = 1.0
  # Numerics and kernels.
  c.model.dtype = "float32"  # compute dtype of matmuls and attention; params are always float32
  c.model.attention = "xla"  # xla (msjax.models.attention.softmax_attention) | cudnn (jax.nn's cuDNN kernel)
  c.model.remat = False
  c.model.scan_layers = True
  # What the head predicts: 'velocity' (Wan, needed for converted weights) or 'x0', turned into the velocity
  # (z_t - x0) / max(t, x0_min_t) inside the model, so every caller still sees a velocity. x0 is for models whose
  # patch vector is wider than model.dim (the toy's pixel-packed latents): noise cannot pass that bottleneck.
  c.model.prediction = "velocity"
  c.model.x0_min_t = 0.05

  # Track conditioning (paper section 2).
  c.tracks = ml_collections.ConfigDict()
  c.tracks.embed_dim = 64  # d of the sinusoidal ID embedding phi_n
  c.tracks.grid = 0  # first-frame grid side (grid x grid query points)
  c.tracks.min_tracks = 0  # random subset size per clip in [min_tracks, max_tracks]
  c.tracks.max_tracks = 0
  c.tracks.max_id = 10000  # IDs are drawn from [0, max_id)
  c.tracks.mask_prob = 0.2  # stochastic mid-chunk masking
  # nearest: a point's ID embedding goes to the latent cell it lies in (paper Eq. 1). bilinear: it is shared
  # among the 4 cells around it by bilinear weights, so the grid also says where inside a cell the point is.
  # Nearest quantises positions to the spatial stride; in the toy world (4 px cells, grid points one per cell,
  # so a sprite's points all cross cells together) that alone costs ~1.6 px of per-frame position error.
  # nearest_offset: nearest's grid plus two channels per cell holding the point's offset from the cell centre,
  # read by a zero-initialised extra input of the track head (so a nearest model can go on as one).
  c.tracks.splat = "nearest"

  # Text encoder that produces the DiT context.
  c.text = ml_collections.ConfigDict()
  c.text.encoder = "learned"  # learned | minilm | precomputed

  # Streaming (chunked causal student).
  c.stream = ml_collections.ConfigDict()
  c.stream.chunk_frames = 3  # latent frames per chunk
  c.stream.sink_chunks = 1
  c.stream.window_chunks = 1
  c.stream.num_steps = 3
  c.stream.rope_mode = "cache"  # cache (MotionStream) | absolute (Self Forcing, grows with the stream)
  return c


def tiny() -> ml_collections.ConfigDict:
  """Toy world: 64x64 px -> 16x16 latent grid -> 8x8 = 64 tokens per latent frame."""
  c = _base()
  c.preset = "tiny"
  c.video.height = 64
  c.video.width = 64
  c.video.num_frames = 45  # 12 latent frames = 4 chunks of 3
  c.codec.name = "pack"
  c.codec.temporal_stride = 4
  c.codec.spatial_stride = 4
  c.codec.latent_channels = 3 * 4 * 4 * 4  # RGB x t x h x w packed into depth
  c.model.dim = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.ffn_dim = 768
  c.model.text_dim = 384  # = MiniLM-L6 width, so real sentence embeddings plug in
  c.model.text_len = 16
  c.model.track_channels = 32
  c.model.prediction = "x0"  # patch vector 2 x 2 x 192 = 768 > dim 256
  c.tracks.grid = 16
  c.tracks.min_tracks = 64
  c.tracks.max_tracks = 256
  return c


def wan2_1_1_3b() -> ml_collections.ConfigDict:
  """Wan 2.1 1.3B, 832x480, 81 frames -> 21 latent frames of 60x104 -> 1560 tokens each."""
  c = _base()
  c.preset = "wan2_1_1_3b"
  c.video.height = 480
  c.video.width = 832
  c.video.num_frames = 81
  c.codec.name = "wan"
  c.codec.temporal_stride = 4
  c.codec.spatial_stride = 8
  c.codec.latent_channels = 16
  c.model.dim = 1536
  c.model.num_layers = 30
  c.model.num_heads = 12
  c.model.ffn_dim = 8960
  c.model.text_dim = 4096  # umT5-XXL
  c.model.text_len = 512
  c.model.track_channels = 16
  c.model.dtype = "bfloat16"
  c.model.attention = "cudnn"
  c.tracks.grid = 50
  c.tracks.min_tracks = 1000
  c.tracks.max_tracks = 2500
  c.text.encoder = "precomputed"
  return c


def wan2_2_5b() -> ml_collections.ConfigDict:
  """Wan 2.2 TI2V 5B, 1280x704, 121 frames -> 31 latent frames of 44x80 -> 880 tokens each."""
  c = _base()
  c.preset = "wan2_2_5b"
  c.video.height = 704
  c.video.width = 1280
  c.video.num_frames = 121
  c.codec.name = "wan"
  c.codec.temporal_stride = 4
  c.codec.spatial_stride = 16
  c.codec.latent_channels = 48
  c.model.dim = 3072
  c.model.num_layers = 30
  c.model.num_heads = 24
  c.model.ffn_dim = 14336
  c.model.text_dim = 4096
  c.model.text_len = 512
  c.model.image_condition = "replace"
  c.model.track_channels = 48
  c.model.dtype = "bfloat16"
  c.model.attention = "cudnn"
  c.tracks.grid = 50
  c.tracks.min_tracks = 1000
  c.tracks.max_tracks = 2500
  c.text.encoder = "precomputed"
  return c


def get_preset(name: str) -> ml_collections.ConfigDict:
  builders = {"tiny": tiny, "wan2_1_1_3b": wan2_1_1_3b, "wan2_2_5b": wan2_2_5b}
  if name not in builders:
    raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
  return builders[name]()
