"""CPU stage: product events → tokens + 224×224 image → tensor records (or dead letters)."""
