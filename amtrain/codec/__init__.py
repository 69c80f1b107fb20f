"""Neural audio codecs: EnCodec (24 / 48 kHz) through transformers, loaded from local weights.

`load_codec(path, model)` -> `Codec` with `encode(wave, bandwidth) -> (codes K x T, scales)` and
`decode(codes, scales) -> wave`. See `amtrain.codec.encodec` and docs/audio.md.
"""

from amtrain.codec.encodec import (
    CODEBOOK_SIZE,
    Codec,
    build_model,
    debug_config,
    encodec_config,
    find_weights,
    init_codebooks_from_audio,
    load_codec,
    original_state_dict,
    original_to_hf_key,
    save_hf_folder,
    save_original_checkpoint,
    stand_in_model,
)

__all__ = ["CODEBOOK_SIZE", "Codec", "build_model", "debug_config", "encodec_config", "find_weights",
           "init_codebooks_from_audio", "load_codec", "original_state_dict", "original_to_hf_key",
           "save_hf_folder", "save_original_checkpoint", "stand_in_model"]
