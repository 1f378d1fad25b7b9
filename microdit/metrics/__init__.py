"""Evaluation metrics: FID (clean-fid resize, cached reference statistics), CLIP score, GenEval.

Each lives in its own module and imports its heavy dependencies lazily:
`microdit.metrics.fid`, `microdit.metrics.clip_score`, `microdit.metrics.geneval`.
"""
