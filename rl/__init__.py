"""Flow-GRPO post-training: SDE rollouts, the GRPO objective, rewards (JPEG/PNG compressibility, a
reward classifier trained by `scripts/train_classifier.py`). Run entry points from the repo root."""
