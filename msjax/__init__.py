"""msjax: MotionStream (real-time motion-controlled video generation) in JAX/Flax."""

__version__ = "0.1.0"
