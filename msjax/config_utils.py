"""Numbers derived from a preset, computed in one place so no shape is written twice."""

from __future__ import annotations

import dataclasses

import ml_collections


class ConfigError(ValueError):
  """A config whose numbers do not fit together; the message says which and why."""


# How a track point is written into the latent grid (config.tracks.splat; msjax.data.tracks.rasterize).
TRACK_SPLATS = ("nearest", "bilinear", "nearest_offset")
# nearest_offset adds this many channels after the ID embedding: the point's (x, y) offset from its cell's centre.
TRACK_OFFSET_CHANNELS = 2


def track_offset_channels(splat: str) -> int:
  """Channels a splat mode appends to the ID embedding in each grid cell (0 or TRACK_OFFSET_CHANNELS)."""
  return TRACK_OFFSET_CHANNELS if splat == "nearest_offset" else 0


def track_grid_channels(config: ml_collections.ConfigDict) -> int:
  """Channels of a rasterised track grid cell: the ID embedding, plus the offset channels of nearest_offset."""
  return config.tracks.embed_dim + track_offset_channels(config.tracks.splat)


def latent_frames(num_frames: int, temporal_stride: int) -> int:
  """Wan's 1 + 4k rule: frame 0 is a latent frame of its own, then one latent frame per `temporal_stride`."""
  if num_frames < 1 or (num_frames - 1) % temporal_stride:
    raise ConfigError(
        f"num_frames must be 1 + {temporal_stride}*k (e.g. {1 + temporal_stride * 11}), got {num_frames}")
  return 1 + (num_frames - 1) // temporal_stride


def video_frames(num_latent_frames: int, temporal_stride: int) -> int:
  """Inverse of `latent_frames`."""
  return 1 + (num_latent_frames - 1) * temporal_stride


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Every derived size of a preset: pixels -> latents -> tokens."""
  height: int
  width: int
  num_frames: int
  latent_frames: int
  latent_height: int
  latent_width: int
  latent_channels: int
  grid_frames: int  # token grid after patchify
  grid_height: int
  grid_width: int
  tokens_per_frame: int
  chunk_frames: int  # latent frames per streaming chunk
  tokens_per_chunk: int
  head_dim: int
  in_channels: int  # DiT input channels (noisy latent + image conditioning + track features)
  out_channels: int


def geometry(config: ml_collections.ConfigDict) -> Geometry:
  """Derives and checks all sizes of `config` (a preset, or an experiment config holding one)."""
  v, codec, m, s = config.video, config.codec, config.model, config.stream
  pt, ph, pw = m.patch_size
  ss = codec.spatial_stride
  if v.height % (ss * ph) or v.width % (ss * pw):
    raise ConfigError(f"video {v.height}x{v.width} must be divisible by spatial stride {ss} x patch {ph}x{pw}")
  f = latent_frames(v.num_frames, codec.temporal_stride)
  if f % pt:
    raise ConfigError(f"{f} latent frames not divisible by temporal patch {pt}")
  if m.dim % m.num_heads:
    raise ConfigError(f"model.dim {m.dim} not divisible by num_heads {m.num_heads}")
  head_dim = m.dim // m.num_heads
  if head_dim % 2 or head_dim < 6:
    raise ConfigError(f"head_dim {head_dim} must be even and >= 6 for 3-axis RoPE")
  if config.tracks.splat not in TRACK_SPLATS:
    raise ConfigError(f"tracks.splat must be one of {TRACK_SPLATS}, got {config.tracks.splat!r}")
  lh, lw = v.height // ss, v.width // ss
  image_channels = {"concat": m.mask_channels + codec.latent_channels, "none": 0, "replace": 0}
  if m.image_condition not in image_channels:
    raise ConfigError(f"model.image_condition must be one of {sorted(image_channels)}, got {m.image_condition!r}")
  in_channels = codec.latent_channels + image_channels[m.image_condition] + m.track_channels
  tokens_per_frame = (lh // ph) * (lw // pw)
  return Geometry(
      height=v.height, width=v.width, num_frames=v.num_frames, latent_frames=f, latent_height=lh,
      latent_width=lw, latent_channels=codec.latent_channels, grid_frames=f // pt, grid_height=lh // ph,
      grid_width=lw // pw, tokens_per_frame=tokens_per_frame, chunk_frames=s.chunk_frames,
      tokens_per_chunk=tokens_per_frame * s.chunk_frames // pt, head_dim=head_dim, in_channels=in_channels,
      out_channels=codec.latent_channels)
