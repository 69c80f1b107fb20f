"""Batches from shards: packing, span corruption, curriculum, priority sampling; rank-aware, resumable."""
