"""Data: the `sprites` toy world, track files and conditioning, tfds builders and the grain pipeline."""
