"""amtrain: sequence models over text, MIDI and neural-audio codes, trained under DeepSpeed ZeRO."""

__version__ = "0.1.0"
