"""The DiT and its streaming cache.

  dit.py          WanDiT (teacher, critic and student), DiTSpec
  track_head.py   Conditioning, the track head, image-conditioning channels
  attention.py    attention kernels (XLA softmax attention, cuDNN), block-causal masks, the cached path
  rope.py         Wan's 3-axis RoPE and the cache-position rule
  kv_cache.py     CacheState and the pure init_cache / denoise / commit functions
"""
