"""The decoder size table: named shapes from `debug` (tests, CI, quickstart) to `xl`, plus the
GPT-2-small shape of the Anticipatory Music Transformer recipe (Thickstun et al. 2023:
768 wide, 12 layers, 12 heads, context 1024). The decoder family's spec (`amtrain.registry`)
holds this table: `family("decoder").config(size, vocab_size=V, **overrides)` turns a name into
a validated `DecoderConfig`.

Sizes are named by their NON-embedding parameter count (Kaplan et al. 2020), because the
(V, D) embedding depends on the tokenizer. Counts below are for the default parallel block
(no biases, one norm per block); a serial block adds one norm (D params) per layer.
Totals are quoted for the gpt2 vocab (50257 -> padded 50304) and the midi vocab
(55028 -> padded 55040); tests/test_models_decoder.py pins every number.

| size     | L  | H  | D   | F    | ctx  | non-embedding | total, gpt2  | total, midi  |
|----------|----|----|-----|------|------|---------------|--------------|--------------|
| debug    | 2  | 4  | 64  | 256  | 256  | 98,496        | 3,317,952    | 3,621,056    |
| tiny     | 5  | 4  | 128 | 512  | 512  | 983,808       | 7,422,720    | 8,028,928    |
| small    | 6  | 8  | 256 | 1024 | 1024 | 4,720,384     | 17,598,208   | 18,810,624   |
| medium   | 12 | 6  | 384 | 1536 | 1024 | 21,238,656    | 40,555,392   | 42,374,016   |
| large    | 16 | 8  | 512 | 2048 | 1024 | 50,340,352    | 76,096,000   | 78,520,832   |
| xl       | 16 | 12 | 768 | 3072 | 1024 | 113,259,264   | 151,892,736  | 155,529,984  |
| amt-gpt2 | 12 | 12 | 768 | 3072 | 1024 | 84,944,640    | 123,578,112  | 127,215,360  |
"""

from __future__ import annotations

DECODER_SIZES: dict[str, dict] = {
    "debug": {"num_layers": 2, "num_heads": 4, "d_model": 64, "max_seq_len": 256},
    "tiny": {"num_layers": 5, "num_heads": 4, "d_model": 128, "max_seq_len": 512},
    "small": {"num_layers": 6, "num_heads": 8, "d_model": 256, "max_seq_len": 1024},
    "medium": {"num_layers": 12, "num_heads": 6, "d_model": 384, "max_seq_len": 1024},
    "large": {"num_layers": 16, "num_heads": 8, "d_model": 512, "max_seq_len": 1024},
    "xl": {"num_layers": 16, "num_heads": 12, "d_model": 768, "max_seq_len": 1024},
    # GPT-2 small as trained by jthickstun/anticipation (train/ on levanter): the shape only;
    # this toolkit's block, norm and RoPE apply unless overridden (block="gpt2" is GPT-2 itself;
    # `amtrain import-hf` loads the released checkpoints, docs/hf.md).
    "amt-gpt2": {"num_layers": 12, "num_heads": 12, "d_model": 768, "max_seq_len": 1024},
}
