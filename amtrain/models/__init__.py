"""Models: layers, the parallel-block decoder, the T5 denoiser, an LSTM baseline. torch only, single-device code: no ranks, no deepspeed."""
