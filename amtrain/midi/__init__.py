"""Symbolic music in the Anticipatory Music Transformer layout.

    events.py     MIDI bytes -> notes -> event arrays, exactly as AMT's mido-based reader (numba)
    tokenize.py   events -> AMT training sequences (filters, augmentation, REST, interleaving)
    decode.py     any ids -> notes -> MIDI (symusic), skipping and counting what is invalid
    pianoroll.py  PNG piano rolls of token sequences or MIDI files

The vocabulary itself is `amtrain.tokens.midi`; the prep pipeline is `amtrain.prep.midi`.
"""
