"""Built-in methods, one file per family. Importing this package registers them all."""

# attention: decoder stage fastv, pyramiddrop; query / transform: trainable unshuffle_mlp, ldpv2, qformer, perceiver
# training-free projector stage: sections of transform, similarity, attention, and baselines; temporal: video clips
from . import attention, baselines, query, similarity, temporal, transform  # noqa: F401,E402
