"""Offline pipelines that turn raw corpora into amtrain datasets (used by `amtrain prep-*`)."""
