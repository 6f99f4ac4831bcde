"""Data stage: formats (readers, phantom generator) -> io -> preprocess/cache -> crops."""
