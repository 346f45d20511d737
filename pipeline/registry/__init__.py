"""Registered versions: verified loading (digests, signatures) from the MLflow Model Registry."""
