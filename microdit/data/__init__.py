"""The data half of the DAG: sources, downloads, captions, MDS shards, latents, loader."""
