"""Flow-GRPO post-training: SDE rollouts, the GRPO objective, rewards (JPEG/PNG compressibility, a
reward classifier trained by `python -m rl.classifier`). Run entry points from the repo root."""
