"""What generated sequences look like against held-out data: statistics and their comparison
(`stats`, `music`, `sets`), prep-audio's chunk features on generated audio (`audio`), held-out
loss (`heldout`) and the PNGs (`plots`). `amtrain evaluate` (amtrain/rollout/evaluate.py) and the
rollouts during training (amtrain/train/rollouts.py) use them. See docs/evaluation.md."""
