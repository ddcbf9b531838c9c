"""The export directory on disk: manifest schema and lock, atomic files, the reference-logit cache."""
