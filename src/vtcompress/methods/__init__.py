"""Built-in methods, one file per family. Importing this package registers them all."""

# attention: decoder stage fastv, pyramiddrop; query / transform: trainable unshuffle_mlp, ldpv2, qformer, perceiver
# training-free projector stage: sections of transform, similarity, attention, and baselines; temporal: clips
from . import _dycoke, _fastvid, _holitom, _prunevid, attention, baselines, query, similarity, temporal, transform  # noqa: F401,E402  # noqa: F401,E402  (work in progress, merged into temporal)
