"""The lossland driver: train one model, track its curvature, record everything.

Default (= `make demo`): MNIST-1D, n=1000, MLP 2×256 ReLU, MSE, full-batch GD,
lr=0.05, 2000 steps.

    python -m experiments.train --workdir=runs/demo --track_every=20
    python -m experiments.train --workdir=runs/demo --resume --steps=4000
    python -m experiments.train --dataset=fashion_mnist --n_train=5000 --model=cnn \\
        --loss=cross_entropy --lr=0.02 --workdir=runs/fmnist
"""

import sys

from absl import app, flags, logging

from lossland import cli, config as config_lib, data as data_lib, distributed, plots, records
from lossland import runner

cli.define_run_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.maybe_initialize()  # multi-host: before any other JAX call (BUILD_NOTES.md)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax's INFO chatter out of the progress
    try:
        cfg = cli.config_from_flags()
        result = runner.run(cfg)
    except (config_lib.ConfigError, data_lib.DataError, records.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_main_process():  # process 0 writes the records and plots
        return result.exit_code
    if cfg.plots:
        written = plots.plot_run(result.workdir)
        print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)
    print(f"{result.status} at step {result.step}; records in {result.workdir}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    app.run(main)
