"""Generation: one decode loop over every model family, behaviour as logits processors.

    processors.py  LogitsProcessor, LogitsProcessorList, temperature / top-k / top-p, ForcedTokens
    grammar.py     token-grammar masks: MIDI (AMT), audio codebooks, base vocabulary, T5 spans
    steps.py       ModelStep adapters: LMStep (decoder, LSTM), T5Step (decoder over an encoder output)
    loop.py        Sampler, decode (the one loop), generate (decoder, LSTM), t5_generate (T5)
    window.py      continuation past the context: sliding window with stride stitching
    t5.py          T5 sentinel in-filling and prefix-LM continuation

Imports flow one way: generate uses `amtrain.models`, `amtrain.tokens` and `amtrain.errors`;
nothing under `amtrain.models` imports it (models expose forward / encode / decode + new_cache).
"""
