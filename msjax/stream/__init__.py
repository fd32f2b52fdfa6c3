"""Streaming generation: the shared chunk rollout (`rollout`) and the real-time sampler (`sampler`)."""
