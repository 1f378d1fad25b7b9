"""Evaluation metrics: FID (clean-fid resize, cached reference statistics), CLIP score, GenEval.

Each lives in its own module and imports its heavy dependencies lazily:
`microdit.metrics.fid`, `microdit.metrics.clip_score`, `microdit.metrics.geneval`.
`microdit.metrics.registry.METRICS` names the ones `microdit evaluate` runs, with the metrics.json
entries each writes and its part of the summary line.
"""
