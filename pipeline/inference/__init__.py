"""Answering with a model: loading the base, label scoring and constrained decoding, and the runtime (adapter merged
or not, bit-identical speed-ups) that eval measures and serving runs."""
