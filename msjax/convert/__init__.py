"""PyTorch checkpoints -> msjax params: a generic rule-table engine (`common`) and one table per model.

  wan      Wan DiT, official `WanModel` and diffusers `WanTransformer3DModel` names -> `WanDiT`
  wan_vae  Wan 2.1 VAE -> the `wan` codec
  taehv    TAEHV (taew2_1) -> the `taehv` codec

CLI: `python -m msjax.convert NAME --src CKPT --out DIR` (see `__main__`).
"""
