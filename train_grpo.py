"""Flow-GRPO post-training: `python train_grpo.py experiment=fashion_grpo_jpeg seed_checkpoint=RUN`.

The trainer is rl/trainer.py's GRPOTrainer; configs are validated in config.py. Exit codes: 0 done (or
already finished), 75 stopped by SIGTERM after saving a checkpoint (requeue the same command), 1 error.
"""

import sys

from cli import exit_on_help
from config import entry_point_help, load_grpo_config, require_tracking_packages
from rl.trainer import GRPOTrainer
from run_dir import resolve_run_dir
from runtime import run_main, setup_runtime


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, __doc__, *entry_point_help("grpo"))
    cfg = load_grpo_config(argv)
    require_tracking_packages(cfg.training)
    runtime = setup_runtime(cfg.device)
    return GRPOTrainer(cfg, runtime, resolve_run_dir(cfg, runtime)).fit()


if __name__ == "__main__":
    run_main(main)
