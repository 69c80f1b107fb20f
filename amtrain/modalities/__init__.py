"""Modalities: one object per token kind, carrying everything that used to be switched on names.

    modality  tokenizers     tape (what rollouts carry)        prompt files            outputs
    text      gpt2, ascii    ids (T,)                          .txt text / ids, .npy   .txt + .npy
    midi      midi           MidiTape(flag, triples (N, 3))    .mid, .txt ids, .npy    .mid + .npy
    audio     audio          codes (K, T)                      .wav/.flac/.ogg/.mp3,   .wav + .npy
                                                               .npz codes, ids, .npy
    tokens    (any other)    ids (T,)                          .txt ids, .npy          .txt ids + .npy

A `Modality` answers, for its datasets and checkpoints:
- data/training: the T5 span layout (`span_layout`), validation metrics from the per-token
  cross-entropy (`val_metrics`), how a training-time rollout prompt is read (`training_prompt`);
- rollouts: how a prompt file becomes a tape (`read_prompt`) and a tape becomes files
  (`write_tape`), and the generation strategies on top of `amtrain.generate`: `continue_tape`,
  `infill_tape`, and for `alternate` the region an in-fill takes (`random_region`,
  `infill_prompt`, `after_infill`);
- after training: the command that samples from the run (`sample_command`).

What differs between left-to-right families (decoder, LSTM) and the T5 denoiser is asked of the
family spec (`rm.family.left_to_right`), never of its name. The base class is the plain-ids
behaviour (the `tokens` modality); `text`, `midi` and `audio` override what they need.

Register a new modality with `amtrain.registry.register_modality(MyModality())` (see
docs/architecture.md, "How to add a modality").
"""

from amtrain.modalities.base import MODES, Modality, RolloutConfig, RolloutModel, SpanLayout

__all__ = ["MODES", "Modality", "RolloutConfig", "RolloutModel", "SpanLayout"]
