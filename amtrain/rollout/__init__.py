"""Generation: sampling, KV cache, continuation / infill strategies, stitching, decoding to files."""
