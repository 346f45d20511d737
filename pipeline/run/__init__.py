"""A run directory and what it records: files, manifest, stage records, staleness, MLflow runs, and the runner that
takes a recipe through the stages."""
