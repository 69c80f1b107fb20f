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


SEED_SIZES_DOC = """The symbolic-music scaling-laws seed's own shapes (issue 15; seed 003's table), selectable
as the `seeds` size table of `amtrain scaling run --size-table seeds` beside the parameter-matched
ladder above, and by name anywhere a size is taken (`--model.size seed-small`).

| size        | D    | L  | H  | d_ff | non-embedding | LSTM (L x D)  | LSTM non-embedding |
|-------------|------|----|----|------|---------------|---------------|--------------------|
| seed-tiny   | 128  | 2  | 2  | 512  | 393,600       | 2 x 156       | 392,184            |
| seed-small  | 256  | 4  | 4  | 1024 | 3,147,008     | 2 x 443       | 3,147,958          |
| seed-medium | 512  | 6  | 8  | 2048 | 18,877,952    | 3 x 886       | 18,862,940         |
| seed-large  | 768  | 8  | 8  | 3072 | 56,630,016    | 4 x 1330      | 56,650,020         |
| seed-xl     | 1024 | 12 | 16 | 4096 | 151,008,256   | 5 x 1942      | 150,936,124        |

The seed lists xl with 12 heads, which do not divide a width of 1024; it runs here with 16
heads of 64 (the head count changes no parameter count). The seed's tiny..xl were quoted as
~1M..100M+ *total* parameters on its ABC vocabulary; the counts above are non-embedding, as the
ladder's. LSTMs (1 to 5 layers, tied embedding) match the decoders' non-embedding counts within
0.4 %, as the ladder's LSTMs do. Context 1024 (the seed trained at its --max-length)."""

SEED_DECODER_SIZES: dict[str, dict] = {
    "seed-tiny": {"num_layers": 2, "num_heads": 2, "d_model": 128, "d_ff": 512, "max_seq_len": 1024},
    "seed-small": {"num_layers": 4, "num_heads": 4, "d_model": 256, "d_ff": 1024, "max_seq_len": 1024},
    "seed-medium": {"num_layers": 6, "num_heads": 8, "d_model": 512, "d_ff": 2048, "max_seq_len": 1024},
    "seed-large": {"num_layers": 8, "num_heads": 8, "d_model": 768, "d_ff": 3072, "max_seq_len": 1024},
    "seed-xl": {"num_layers": 12, "num_heads": 16, "d_model": 1024, "d_ff": 4096, "max_seq_len": 1024},
}
SEED_LSTM_SIZES: dict[str, dict] = {
    "seed-tiny": {"num_layers": 2, "d_model": 156},
    "seed-small": {"num_layers": 2, "d_model": 443},
    "seed-medium": {"num_layers": 3, "d_model": 886},
    "seed-large": {"num_layers": 4, "d_model": 1330},
    "seed-xl": {"num_layers": 5, "d_model": 1942},
}

SIZE_TABLES: dict[str, tuple[str, ...]] = {
    "ladder": ("debug", "tiny", "small", "medium", "large", "xl"),
    "seeds": tuple(SEED_DECODER_SIZES),
}
"""`amtrain scaling run --size-table NAME`: the size names of each table (`--sizes` picks among
them by their short name: tiny, small, ...)."""


def table_sizes(table: str, sizes: list[str] | None) -> list[str]:
    """The size names a study runs: `sizes` (short names, e.g. tiny) inside `table`, or all of it
    but `debug` when None."""
    from amtrain.errors import UserError

    if table not in SIZE_TABLES:
        raise UserError(f"--size-table {table!r}: choose one of {', '.join(SIZE_TABLES)}")
    names = SIZE_TABLES[table]
    if sizes is None:
        return [n for n in names if n != "debug"]
    prefix = "seed-" if table == "seeds" else ""
    out = []
    for s in sizes:
        full = s if s in names else prefix + s
        if full not in names:
            raise UserError(f"--sizes {s}: not in the {table} size table ({', '.join(names)})")
        out.append(full)
    return out
