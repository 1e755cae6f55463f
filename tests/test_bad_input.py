"""Bad input: a catalog of invalid invocations of the driver and of the experiments.

Each case of CASES runs a program as a user would, `python -m MODULE ARGS`, and must
  * exit non-zero, without a Python traceback, with a message that holds every
    string of `expect`: the flag, and where there is a choice what is allowed or
    how to fix it;
  * fail before any compute: the programs run with JAX_LOG_COMPILES=1, and their
    stderr shows no XLA compilation (tracing shapes is allowed); and in seconds;
  * leave its folder exactly as it was: every path under the case's folder, with
    its type, mode, size, mtime and content hash, is the same after the call, so a
    workdir that did not exist still does not, and no config.json, metrics.jsonl
    or checkpoint appeared.

How the programs run. A fresh interpreter spends ~3 s of CPU importing JAX,
flax, optax and orbax before it parses a flag; ~100 cases of that take minutes on
two shared cores. So one helper process (FORK_SERVER) imports those packages
once, without starting a JAX backend, and forks a child per case, which runs the
module as `__main__` (runpy, as `python -m` does) with the case's argv, stdout
and stderr in files. Two tests keep this honest: `test_fork_server_sees_compilation`
(a valid run through the same server does show its compilations, so their absence
in a refused case means something) and `test_fresh_interpreters_agree` (a sample of
cases, one per kind of refusal, also run as fresh `python -m` subprocesses: same
exit code, same message, nothing written).

Faking a TPU: the float64 case's child replaces `jax.default_backend` by a
function returning "tpu" before the program starts; that is what
`experiment.check_dtype_backend` asks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_module
from lossland import data as data_lib, records

# A small run: if a case were not refused, it would fail fast (and compile).
TINY = ("--dataset=gaussian_mixture", "--n_train=64", "--width=16", "--depth=1", "--steps=3",
        "--noplots")
SWEEP = ("--preset=smoke", "--progress=false")
EOS = ("--dataset=gaussian_mixture", "--n_train=64", "--width=16", "--depth=1", "--lrs=0.1",
       "--lr_steps_product=1", "--noplots")
SUBSPACE = ("--preset=smoke",)
REPRODUCE = ("--preset=smoke",)
FAST_S = 60            # a refusal takes well under this even on the loaded 2-core machine
CASE_TIMEOUT_S = 300   # a case that is not refused is killed after this
COMPILE_LOG = re.compile(r"Compiling |XLA compilation")
LOG_LINE = re.compile(r"^[IWEF]\d{4} ")   # absl log lines (JAX_LOG_COMPILES' tracing lines)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    module: str
    args: tuple        # {w}: the workdir, {d}: a data folder, {missing}: a path that is not there
    expect: tuple      # substrings of the message
    setup: str = "absent"   # what the case's folder holds before the call (SETUPS)
    backend: str = ""       # fake jax.default_backend() in the child


def train(id, *args, expect, setup="absent", backend=""):
    return Case(f"train-{id}", "experiments.train", (*TINY, *args, "--workdir={w}"),
                tuple(expect), setup, backend)


def sweep(id, *args, expect, setup="absent"):
    return Case(f"sweep_n-{id}", "experiments.sweep_n", (*SWEEP, *args, "--workdir={w}"),
                tuple(expect), setup)


def eos(id, *args, expect, setup="absent"):
    return Case(f"eos-{id}", "experiments.eos", (*EOS, *args, "--workdir={w}"), tuple(expect),
                setup)


def subspace(id, *args, expect, setup="absent"):
    return Case(f"subspace-{id}", "experiments.subspace", (*SUBSPACE, *args, "--workdir={w}"),
                tuple(expect), setup)


def reproduce(id, *args, expect, setup="absent"):
    return Case(f"reproduce-{id}", "experiments.reproduce", (*REPRODUCE, *args, "--workdir={w}"),
                tuple(expect), setup)


def analyze(id, *args, expect, setup="absent"):
    return Case(f"analyze-{id}", "experiments.analyze", (*args, "--workdir={missing}"),
                tuple(expect), setup)


FMNIST = ("--dataset=fashion_mnist", "--data_dir={d}")

CASES = [
    # --- the driver: every numeric flag out of range ---------------------------------------
    train("n_train-zero", "--n_train=0", expect=["--n_train=0", "positive integer"]),
    train("n_train-over-dataset", "--dataset=fashion_mnist", "--n_train=70000",
          expect=["--n_train=70000", "60000"]),
    train("input_dim-zero", "--input_dim=0", expect=["--input_dim=0", "positive integer"]),
    train("num_classes-one", "--num_classes=1", expect=["--num_classes=1", ">= 2"]),
    train("width-zero", "--width=0", expect=["--width=0", "positive integer"]),
    train("depth-zero", "--depth=0", expect=["--depth=0", "positive integer"]),
    train("lr-zero", "--lr=0", expect=["--lr=0", "must be > 0"]),
    train("lr-negative", "--lr=-0.1", expect=["--lr=-0.1", "must be > 0"]),
    train("momentum-one", "--optimizer=momentum", "--momentum=1.0",
          expect=["--momentum=1.0", "[0, 1)"]),
    train("batch_size-zero", "--optimizer=sgd", "--batch_size=0",
          expect=["--batch_size=0", "positive integer"]),
    train("batch_size-over-n", "--optimizer=sgd", "--batch_size=100",
          expect=["--batch_size=100", "--n_train=64"]),
    train("steps-negative", "--steps=-1", expect=["--steps=-1", "non-negative"]),
    train("seed-negative", "--seed=-1", expect=["--seed=-1", "non-negative"]),
    train("seed-over-mnist1d-range", "--dataset=mnist1d", "--seed=5000",
          expect=["--seed=5000", "0..4293"]),
    train("chunk_size-zero", "--chunk_size=0", expect=["--chunk_size=0", "positive integer"]),
    train("num_devices-negative", "--num_devices=-1", expect=["--num_devices=-1", "non-negative"]),
    train("num_devices-more-than-present", "--num_devices=64",
          expect=["--num_devices=64", "device(s)", "Use --num_devices<="]),
    train("log_every-zero", "--log_every=0", expect=["--log_every=0", "positive integer"]),
    train("checkpoint_every-negative", "--checkpoint_every=-1",
          expect=["--checkpoint_every=-1", "non-negative"]),
    train("track_every-negative", "--track_every=-1", expect=["--track_every=-1", "non-negative"]),
    train("track_k-zero", "--track_k=0", expect=["--track_k=0", "positive integer"]),
    train("track_k-over-param-count", "--track_every=1", "--track_k=1000", "--lanczos_iters=1000",
          expect=["--track_k=1000", "506 parameters", "Use --track_k<=506"]),
    train("lanczos_iters-zero", "--lanczos_iters=0", expect=["--lanczos_iters=0", "positive"]),
    train("lanczos_iters-under-track_k", "--track_k=10", "--lanczos_iters=5",
          expect=["--lanczos_iters=5", ">= --track_k=10"]),
    train("lanczos_tol-negative", "--lanczos_tol=-1", expect=["--lanczos_tol=-1", ">= 0"]),
    train("track_block_size-negative", "--track_block_size=-1",
          expect=["--track_block_size=-1", "non-negative"]),
    train("track_block_size-under-track_k", "--tracker=block", "--track_every=1", "--track_k=5",
          "--track_block_size=3",
          expect=["--track_block_size=3", "must be >= --track_k", "Raise --track_block_size"]),
    train("track_layers_k-zero", "--track_layers_k=0",
          expect=["--track_layers_k=0", "positive integer"]),
    train("track_layers_k-over-layer-size", "--track_layers", "--track_every=1",
          "--track_layers_k=200", "--lanczos_iters=300",
          expect=["--track_layers_k=200", "Dense_1 has 170 parameters",
                  "Use --track_layers_k<=170"]),
    train("track_layers_k-over-lanczos_iters", "--track_layers", "--track_every=1",
          "--track_layers_k=12", "--track_k=2", "--lanczos_iters=10",
          expect=["--track_layers_k=12", "--lanczos_iters=10", "Raise --lanczos_iters"]),
    train("track_layers-untracked", "--track_layers",
          expect=["--track_layers=True", "Set --track_every > 0"]),
    train("track_min-untracked", "--track_min", expect=["--track_min=True", "Set --track_every > 0"]),
    train("trace_every-negative", "--trace_every=-1", expect=["--trace_every=-1", "non-negative"]),
    train("trace_every-not-multiple", "--track_every=5", "--trace_every=7",
          expect=["--trace_every=7", "multiple of --track_every=5"]),
    train("stream-with-sgd", "--tracker=stream", "--track_every=1", "--optimizer=sgd",
          "--batch_size=16", expect=["--optimizer='sgd'", "--tracker=stream", "['gd']",
                                     "Use --tracker=lanczos"]),
    train("stream-with-projection", "--tracker=stream", "--track_every=1", "--projection=dom",
          "--projection_k=2", expect=["--projection='dom'", "--tracker=stream"]),
    train("stream-with-track_gn", "--tracker=stream", "--track_every=1", "--track_gn",
          expect=["--track_gn=True", "--tracker=stream"]),
    train("stream-block-under-track_k", "--tracker=stream", "--track_every=1", "--track_k=5",
          "--track_block_size=3",
          expect=["--track_block_size=3", "must be >= --track_k", "Raise --track_block_size"]),
    train("stream_refresh-over-block", "--tracker=stream", "--track_every=1", "--track_k=2",
          "--track_block_size=3", "--stream_refresh=5",
          expect=["--stream_refresh=5", "at most the block's 3 rows"]),
    train("stream_refresh-negative", "--stream_refresh=-1", expect=["--stream_refresh=-1", ">= 0"]),
    train("stream_check_every-negative", "--stream_check_every=-1",
          expect=["--stream_check_every=-1", ">= 0"]),
    train("stream_check_every-not-multiple", "--tracker=stream", "--track_every=3",
          "--stream_check_every=10",
          expect=["--stream_check_every=10", "multiple of --track_every=3"]),
    train("density_every-negative", "--density_every=-1",
          expect=["--density_every=-1", "non-negative"]),
    train("density_every-not-multiple", "--track_every=5", "--density_every=7",
          expect=["--density_every=7", "multiple of --track_every=5"]),
    train("eos_hold_steps-negative", "--eos_hold_steps=-1",
          expect=["--eos_hold_steps=-1", "non-negative"]),
    train("eos_hold_steps-untracked", "--eos_hold_steps=100",
          expect=["--eos_hold_steps=100", "Set --track_every > 0"]),
    train("eos_threshold-zero", "--eos_threshold=0", expect=["--eos_threshold=0", "must be > 0"]),
    train("eos_window-zero", "--eos_window=0", expect=["--eos_window=0", "positive integer"]),
    train("probe_every-negative", "--probe_every=-1", expect=["--probe_every=-1", "non-negative"]),
    train("probe_every-not-multiple", "--track_every=5", "--probe_every=7",
          expect=["--probe_every=7", "multiple of --track_every=5"]),
    train("probe_s_max-zero", "--probe_s_max=0", expect=["--probe_s_max=0", "must be > 0"]),
    train("probe_s_max_steps-negative", "--probe_s_max_steps=-2",
          expect=["--probe_s_max_steps=-2", "must be >= 0"]),
    train("probe_s_max_theta-nan", "--probe_s_max_theta=nan",
          expect=["--probe_s_max_theta=nan", "must be >= 0"]),
    train("n_test-beyond-the-test-split", "--dataset=fashion_mnist", "--n_test=20000",
          expect=["--n_test=20000", "fashion_mnist has 10000 test examples", "--n_test<=10000"]),
    train("eval_every-without-n_test", "--eval_every=5",
          expect=["--eval_every=5", "Set --n_test > 0"]),
    train("probe_from_eos-without-probes", "--probe_from_eos",
          expect=["--probe_from_eos=True", "Set --probe_every > 0"]),
    train("probe_points-four", "--probe_points=4", expect=["--probe_points=4", ">= 5"]),
    train("num_random_directions-negative", "--num_random_directions=-1",
          expect=["--num_random_directions=-1", "non-negative"]),
    train("projection_k-negative", "--projection_k=-1",
          expect=["--projection_k=-1", "non-negative"]),
    train("projection-without-projection_k", "--projection=dom", "--projection_k=0",
          expect=["--projection_k=0", "--projection=dom", "Set --projection_k"]),
    train("projection_k-over-lanczos_iters", "--projection=bulk", "--projection_k=20",
          "--lanczos_iters=10", expect=["--projection_k=20", "--lanczos_iters=10"]),
    train("refresh_every-zero", "--refresh_every=0", expect=["--refresh_every=0", "positive"]),
    train("switch_step-negative", "--switch_step=-1", expect=["--switch_step=-1", "non-negative"]),
    # --- the driver: malformed values, unknown names --------------------------------------
    train("eos_band-reversed", "--eos_band=1.1,0.9",
          expect=["--eos_band='1.1,0.9'", "0 < lo <= hi", "--eos_band=0.9,1.1"]),
    train("eos_band-one-number", "--eos_band=0.9", expect=["--eos_band='0.9'", "two numbers"]),
    train("eos_band-not-numbers", "--eos_band=low,high",
          expect=["--eos_band=low,high", "two numbers"]),
    train("dataset-unknown", "--dataset=imagenet",
          expect=["--dataset='imagenet'", "fashion_mnist", "path/to/file.npz"]),
    train("model-unknown", "--model=transformer",
          expect=["--model='transformer'", "['cnn', 'mlp', 'resnet', 'vit']",
                  "path/to/file.py:callable"]),
    # --- analyze: a run without θ, a params file that does not fit -------------------------
    analyze("run_dir-without-checkpoints", "--run_dir={w}", setup="killed_at_start",
            expect=["--run_dir=<root>/run", "no committed checkpoint"]),
    analyze("run_dir-not-a-run", "--run_dir={missing}",
            expect=["--run_dir=<root>/nowhere", "config.json", "not a lossland run"]),
    analyze("step-not-saved", "--run_dir={w}", "--step=7", setup="finished",
            expect=["--step=7", "checkpoints at steps [3]"]),
    analyze("neither-run_dir-nor-params", *TINY, expect=["exactly one of --run_dir", "--params"]),
    analyze("params-shape-mismatch", *TINY, "--params={d}/params.npz", setup="params:wrong",
            expect=["--params=<root>/data/params.npz", "'Dense_0/kernel'", "(20, 8)",
                    "(20, 16)"]),
    analyze("params-neither-npz-nor-checkpoint", *TINY, "--params={w}", setup="notes",
            expect=["--params=<root>/run", "neither an .npz file nor an orbax checkpoint",
                    "RUN/checkpoints/<step>"]),
    analyze("params-run-without-checkpoints", *TINY, "--params={w}", setup="killed_at_start",
            expect=["--params=<root>/run", "no committed checkpoint"]),
    analyze("params-checkpoint-shape-mismatch", *TINY, "--width=8", "--params={w}",
            setup="finished", expect=["--params=<root>/run (checkpoint of step 3)",
                                      "'Dense_0/bias' has shape (16,)", "(8,)"]),
    analyze("k-over-iters", "--run_dir={w}", "--k=50", "--lanczos_iters=20", setup="finished",
            expect=["--k=50", "--lanczos_iters=20"]),
    train("norm-unknown", "--model=resnet", "--depth=8", "--norm=group",
          expect=["--norm=group", "none|batch|layer"]),
    train("norm-for-mlp", "--norm=batch", expect=["--norm='batch'", "only --model=resnet",
                                                   "Drop --norm"]),
    train("resnet-depth-not-6n+2", "--model=resnet", "--depth=9",
          expect=["--depth=9", "6n + 2", "--depth=8"]),
    train("resnet-width-too-wide", "--model=resnet", "--depth=8", "--width=1000",
          expect=["--width=1000", "1..256"]),
    train("vit-width-not-multiple-of-heads", "--model=vit", "--width=6",
          expect=["--width=6", "multiple of the 4 attention heads", "--width=4"]),
    train("vit-depth-too-deep", "--model=vit", "--depth=30", expect=["--depth=30", "1..24"]),
    train("patch_size-zero", "--model=vit", "--patch_size=0",
          expect=["--patch_size=0", "positive integer"]),
    train("patch_size-does-not-divide", "--model=vit", "--dataset=mnist1d", "--patch_size=3",
          expect=["--patch_size=3", "divide", "40", "[1, 2, 4, 5, 8, 10, 20, 40]"]),
    train("activation-unknown", "--activation=swish", expect=["--activation=swish", "tanh"]),
    train("loss-unknown", "--loss=hinge", expect=["--loss=hinge", "cross_entropy"]),
    train("optimizer-unknown", "--optimizer=lbfgs", expect=["--optimizer=lbfgs", "adam"]),
    train("dtype-unknown", "--dtype=float16", expect=["--dtype=float16", "float64"]),
    train("tracker-unknown", "--tracker=foo", expect=["--tracker=foo", "<lanczos|block|stream>"]),
    train("projection-unknown", "--projection=middle",
          expect=["--projection=middle", "<none|dom|bulk>"]),
    train("matmul_precision-unknown", "--matmul_precision=tf32",
          expect=["--matmul_precision=tf32", "highest"]),
    train("flag-unknown", "--learning_rate=0.1", expect=["learning_rate", "Unknown"]),
    train("float64-on-tpu", "--dtype=float64", backend="tpu",
          expect=["--dtype='float64'", "TPU", "--dtype=float32"]),
    # --- the driver: workdirs and --resume -------------------------------------------------
    train("workdir-is-a-file", setup="file", expect=["--workdir=", "is not a directory"]),
    train("workdir-exists", setup="notes",
          expect=["--workdir=", "not empty", "--overwrite", "--resume"]),
    train("overwrite-and-resume", "--overwrite", "--resume", setup="finished",
          expect=["--resume", "--overwrite", "exclusive"]),
    train("resume-no-run-no-checkpoint", "--resume", setup="notes",
          expect=["--resume", "no config.json", "--overwrite"]),
    train("resume-killed-before-checkpoint-lr-changed", "--resume", "--lr=0.1",
          setup="killed_at_start", expect=["--resume", "--lr was 0.05, now 0.1", "--overwrite"]),
    train("resume-finished-lr-changed", "--resume", "--lr=0.1", setup="finished",
          expect=["--resume", "--lr was 0.05, now 0.1", "--overwrite"]),
    train("resume-finished-width-changed", "--resume", "--width=32", setup="finished",
          expect=["--resume", "--width was 16, now 32"]),
    # --- the driver: dataset files ----------------------------------------------------------
    train("data_dir-missing", "--dataset=fashion_mnist", "--data_dir={missing}",
          expect=["--data_dir=", "missing IDX files", "train-images-idx3-ubyte"]),
    train("mnist-without-data_dir", "--dataset=mnist", expect=["--data_dir", "mnist"]),
    train("cifar10-data_dir-missing", "--dataset=cifar10", "--data_dir={missing}",
          expect=["--data_dir", "data_batch_1"]),
    train("fmnist-labels-missing", *FMNIST, setup="fmnist:labels_missing",
          expect=["--data_dir=", "missing IDX files", "train-labels-idx1-ubyte"]),
    train("fmnist-not-gzip", *FMNIST, setup="fmnist:not_gzip",
          expect=["--data_dir=", "corrupt or truncated", "train-images-idx3-ubyte.gz"]),
    train("fmnist-truncated-gzip", *FMNIST, setup="fmnist:truncated_gz",
          expect=["--data_dir=", "corrupt or truncated", "train-images-idx3-ubyte.gz"]),
    train("fmnist-payload-shorter-than-header", *FMNIST, setup="fmnist:short_payload",
          expect=["--data_dir=", "header says shape (60000, 28, 28)", "corrupt or truncated"]),
    train("fmnist-uncompressed-truncated", *FMNIST, setup="fmnist:raw_truncated",
          expect=["--data_dir=", "train-images-idx3-ubyte ", "corrupt or truncated"]),
    train("fmnist-bad-magic", *FMNIST, setup="fmnist:bad_magic",
          expect=["--data_dir=", "bad magic number"]),
    train("fmnist-too-few-examples", *FMNIST, setup="fmnist:small",
          expect=["--data_dir=", "(100, 28, 28)", "published train split has (60000, 28, 28)"]),
    train("fmnist-images-labels-disagree", *FMNIST, setup="fmnist:mismatched",
          expect=["--data_dir=", "(99,)", "expected (n, rows, cols) and (n,)"]),
    train("fmnist-label-out-of-range", *FMNIST, setup="fmnist:bad_labels",
          expect=["--data_dir=", "label 12", "expected 0..9"]),
    # --- the driver: plug-in models (README: Your own model and data) ---------------------
    train("model-module-does-not-import", "--model=no_such_package.nets:make",
          expect=["--model=no_such_package.nets:make", "does not import",
                  "ModuleNotFoundError", "no_such_package"]),
    train("model-file-does-not-import", "--model={d}/broken.py:make", setup="plugins",
          expect=["--model=<root>/data/broken.py:make", "does not import", "ModuleNotFoundError",
                  "not_installed_anywhere"]),
    train("model-callable-missing", "--model={d}/nets.py:nope", setup="plugins",
          expect=["--model=<root>/data/nets.py:nope", "no callable 'nope'"]),
    train("model-returns-no-module", "--model={d}/nets.py:not_a_module", setup="plugins",
          expect=["--model=<root>/data/nets.py:not_a_module", "returned a dict",
                  "not a Flax Module"]),
    train("model-outputs-wrong-classes", "--model={d}/nets.py:three_outputs", setup="plugins",
          expect=["--model=<root>/data/nets.py:three_outputs", "shape (2, 3)",
                  "expected (2, 10)"]),
    train("model_kwargs-not-json", "--model=lossland.models:make_mlp", "--model_kwargs={{width",
          expect=["--model_kwargs='{width'", "not JSON"]),
    train("model_kwargs-unknown-argument", "--model=lossland.models:make_mlp",
          '--model_kwargs={{"widht": 4}}',
          expect=["""--model_kwargs='{"widht": 4}'""", "widht", "f(input_shape=..."]),
    train("model_kwargs-for-builtin", '--model_kwargs={{"width": 4}}',
          expect=["--model_kwargs=", "--model=mlp", "Drop --model_kwargs"]),
    train("track_layers-no-layer-structure", "--model={d}/nets.py:one_layer", "--track_layers",
          "--track_every=1", setup="plugins",
          expect=["--track_layers=True", "--model=<root>/data/nets.py:one_layer",
                  "top-level module"]),
    train("model-dropout-linen", "--model={d}/nets.py:dropout", setup="plugins",
          expect=["--model=<root>/data/nets.py:dropout", "random", "deterministic"]),
    train("model-dropout-nnx", "--model={d}/nets.py:nnx_dropout", setup="plugins",
          expect=["--model=<root>/data/nets.py:nnx_dropout", "random", "deterministic"]),
    train("model-batchnorm-chunk-with-padding", "--model={d}/nets.py:batchnorm",
          "--chunk_size=48", setup="plugins",
          expect=["--chunk_size=48", "--n_train=64", "batch statistics",
                  "--chunk_size dividing --n_train"]),
    train("resume-model-file-changed", "--resume", "--model={d}/nets.py:tiny",
          setup="plugins:finished",
          expect=["--resume", "--model=<root>/data/nets.py:tiny changed", "--overwrite"]),
    # --- the driver: plug-in data and data files that would run code ---------------------
    train("npz-lacks-y", "--dataset={d}/mine.npz", setup="npz:no_y",
          expect=["--dataset=<root>/data/mine.npz", "lacks y"]),
    train("npz-lacks-x", "--dataset={d}/mine.npz", setup="npz:no_x",
          expect=["--dataset=<root>/data/mine.npz", "lacks x"]),
    train("npz-labels-out-of-range", "--dataset={d}/mine.npz", setup="npz:label_10",
          expect=["--dataset=<root>/data/mine.npz", "label 10", "[0, 10)", "--num_classes"]),
    train("npz-nan-inputs", "--dataset={d}/mine.npz", setup="npz:nan",
          expect=["--dataset=<root>/data/mine.npz", "NaN", "finite"]),
    train("npz-fewer-examples-than-n_train", "--dataset={d}/mine.npz", setup="npz:small",
          expect=["--n_train=64", "--dataset=<root>/data/mine.npz", "holds 32",
                  "Use --n_train<=32"]),
    train("npz-object-arrays", "--dataset={d}/mine.npz", setup="npz:objects",
          expect=["--dataset=<root>/data/mine.npz", "without running code"]),
    train("dataset-callable-missing", "--dataset={d}/nets.py:no_data", setup="plugins",
          expect=["--dataset=<root>/data/nets.py:no_data", "no callable 'no_data'"]),
    train("cifar10-pickle-runs-code", "--dataset=cifar10", "--data_dir={d}", setup="cifar:evil",
          expect=["cifar10: refused <root>/data/data_batch_1", "posix.mkdir",
                  "must not run code"]),
    # --- experiments.sweep_n -----------------------------------------------------------------
    sweep("n_values-zero", "--n_values=0,64", expect=["--n_values=[0, 64]", "positive"]),
    sweep("n_values-not-integers", "--n_values=a,b", expect=["--n_values=a,b", "integers"]),
    sweep("seeds-repeated", "--seeds=1,1", expect=["--seeds=[1, 1]", "distinct"]),
    sweep("seeds-negative", "--seeds=-1", expect=["--seeds=[-1]", ">= 0"]),
    sweep("dataset-unknown", "--dataset=imagenet", expect=["--dataset='imagenet'", "mnist1d"]),
    sweep("activations-unknown", "--activations=swish",
          expect=["--activations='swish'", "tanh"]),
    sweep("losses-unknown", "--losses=hinge", expect=["--losses='hinge'", "cross_entropy"]),
    sweep("model-unknown", "--model=transformer", expect=["--model='transformer'", "mlp"]),
    sweep("preset-unknown", "--preset=huge", expect=["--preset=huge", "smoke"]),
    sweep("hold_steps-zero", "--hold_steps=0", expect=["--hold_steps=0", "> 0"]),
    sweep("max_steps-negative", "--max_steps=-1", expect=["--max_steps=-1", "> 0"]),
    sweep("track_every-zero", "--track_every=0", expect=["--track_every=0", "> 0"]),
    sweep("lr-zero", "--lr=0", expect=["--lr=0", "> 0"]),
    sweep("track_k-zero", "--track_k=0", expect=["--track_k=0", ">= 1"]),
    sweep("chunk_size-zero", "--chunk_size=0", expect=["--chunk_size=0", "> 0"]),
    sweep("probe_every-not-multiple", "--probe_every=7",
          expect=["--probe_every=7", "multiple of --track_every=5"]),
    sweep("eos_band-reversed", "--eos_band=1.2,0.8", expect=["--eos_band='1.2,0.8'", "0 < lo <= hi"]),
    sweep("eos_band-not-numbers", "--eos_band=x,y", expect=["--eos_band='x,y'", "two numbers"]),
    sweep("eos_window-zero", "--eos_window=0", expect=["--eos_window=0", ">= 1"]),
    sweep("n_values-beyond-the-dataset", "--dataset=fashion_mnist", "--n_values=500,70000",
          expect=["--n_values='500,70000'", "fashion_mnist has 60000 training examples",
                  "lower --n_values"]),
    sweep("probe_s_max_steps-negative", "--probe_s_max_steps=-1",
          expect=["--probe_s_max_steps=-1", "must be >= 0"]),
    sweep("confidence-over-one", "--confidence=1.5", expect=["--confidence=1.5", "(0, 1)"]),
    sweep("num_bootstrap-ten", "--num_bootstrap=10", expect=["--num_bootstrap=10", ">= 100"]),
    sweep("workdir-is-a-file", setup="file", expect=["--workdir=", "is not a directory"]),
    sweep("data_dir-missing", "--dataset=fashion_mnist", "--data_dir={missing}",
          expect=["--data_dir=", "missing IDX files"]),
    sweep("fmnist-truncated-gzip", *FMNIST, setup="fmnist:truncated_gz",
          expect=["--data_dir=", "corrupt or truncated"]),
    # --- experiments.eos ----------------------------------------------------------------------
    eos("lrs-not-numbers", "--lrs=abc", expect=["--lrs=abc", "numbers"]),
    eos("lrs-negative", "--lrs=0.1,-1", expect=["--lrs=0.1,-1", "> 0"]),
    eos("lr_steps_product-negative", "--lr_steps_product=-5",
        expect=["--lr_steps_product=-5", "non-negative"]),
    eos("track_every-zero", "--track_every=0", expect=["--track_every=0", "> 0"]),
    eos("width-zero", "--width=0", expect=["--width=0", "positive integer"]),
    eos("tracker-unknown", "--tracker=foo", expect=["--tracker=foo", "<lanczos|block|stream>"]),
    eos("workdir-is-a-file", setup="file", expect=["--workdir=", "is not a directory"]),
    eos("data_dir-missing", "--dataset=fashion_mnist", "--data_dir={missing}",
        expect=["--data_dir=", "missing IDX files"]),
    # --- experiments.subspace -------------------------------------------------------------------
    subspace("variants-unknown", "--variants=gd,newton", expect=["--variants=gd,newton", "dom"]),
    subspace("variants-repeated", "--variants=gd,gd", expect=["--variants=gd,gd", "distinct"]),
    subspace("k-zero", "--k=0", expect=["--k=0", ">= 1", "Set --k"]),
    subspace("k-over-param-count", "--k=5000", expect=["--k=5000", "826 parameters"]),
    subspace("steps-zero", "--steps=0", expect=["--steps=0", "positive integer"]),
    subspace("lr-zero", "--lr=0", expect=["--lr=0", "> 0"]),
    subspace("eos_threshold-zero", "--eos_threshold=0", expect=["--eos_threshold=0", "> 0"]),
    subspace("seed-negative", "--seed=-3", expect=["--seed=-3", ">= 0"]),
    subspace("start-unknown", "--start=middle", expect=["--start=middle", "<eos|init>"]),
    subspace("workdir-is-a-file", setup="file", expect=["--workdir=", "is not a directory"]),
    subspace("workdir-exists", setup="notes",   # and no --resume, which subspace has not
             expect=["--workdir=", "not empty", "--overwrite to replace its records, or choose"]),
    subspace("seeds-not-integers", "--seeds=0,one", expect=["--seeds=0,one", "distinct integers"]),
    subspace("seeds-repeated", "--seeds=1,1", expect=["--seeds=1,1", "distinct integers"]),
    subspace("seeds-and-seed", "--seeds=0,1", "--seed=2",
             expect=["--seed=2", "--seeds=0,1", "exclusive", "Drop --seed"]),
    subspace("seeds-negative", "--seeds=0,-1", expect=["--seeds=0,-1", "--seed=-1", ">= 0"]),
    subspace("seeds-workdir-foreign", "--seeds=0,1", setup="notes",
             expect=["--workdir=", "notes.txt", "not a multi-seed", "--overwrite"]),
    # --- experiments.reproduce ------------------------------------------------------------------
    reproduce("only-unknown", "--only=eos,foo", expect=["--only=eos,foo", "sweep_n"]),
    reproduce("preset-unknown", "--preset=huge", expect=["--preset=huge", "quick"]),
    reproduce("workdir-is-a-file", setup="file", expect=["--workdir=", "is not a directory"]),
]
CASE_IDS = [case.id for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"

# One case per kind of refusal, for the fresh-interpreter cross-check.
FRESH_SAMPLE = ("train-lr-zero", "train-track_k-over-param-count", "train-workdir-exists",
                "train-resume-finished-lr-changed", "train-fmnist-truncated-gzip",
                "sweep_n-eos_band-not-numbers", "eos-workdir-is-a-file", "subspace-k-zero")


# ----------------------------------------------------------------------------
# Folders: what a case starts from, and a snapshot to compare after
# ----------------------------------------------------------------------------

def _fake_fashion_mnist(folder: Path, kind: str) -> None:
    """Fashion-MNIST IDX files broken one way each (the labels stay valid unless named)."""
    folder.mkdir()
    images, labels = folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    header = lambda shape: bytes([0, 0, 8, len(shape)]) + b"".join(
        int(v).to_bytes(4, "big") for v in shape)
    if kind != "bad_labels":
        data_lib.write_idx(labels, np.zeros(60000, np.uint8))
    if kind == "labels_missing":
        data_lib.write_idx(images, np.zeros((100, 28, 28), np.uint8))
        labels.unlink()
    elif kind == "not_gzip":
        images.write_bytes(b"this is not a gzip stream\n" * 40)
    elif kind == "truncated_gz":
        whole = gzip.compress(header((1000, 28, 28)) + os.urandom(1000 * 784), 1)
        images.write_bytes(whole[:len(whole) // 2])
    elif kind == "short_payload":
        images.write_bytes(gzip.compress(header((60000, 28, 28)) + bytes(1000 * 784), 1))
    elif kind == "raw_truncated":
        (folder / "train-images-idx3-ubyte").write_bytes(header((60000, 28, 28)) + bytes(5000))
    elif kind == "bad_magic":
        images.write_bytes(gzip.compress(bytes([0, 0, 0x0D, 3]) + bytes(8 + 100 * 784), 1))
    elif kind == "small":
        data_lib.write_idx(images, np.zeros((100, 28, 28), np.uint8))
        data_lib.write_idx(labels, np.zeros(100, np.uint8))
    elif kind == "mismatched":
        data_lib.write_idx(images, np.zeros((100, 28, 28), np.uint8))
        data_lib.write_idx(labels, np.zeros(99, np.uint8))
    elif kind == "bad_labels":
        images.write_bytes(gzip.compress(header((60000, 28, 28)) + bytes(60000 * 784), 1))
        data_lib.write_idx(labels, np.full(60000, 12, np.uint8))
    else:
        raise ValueError(kind)


PLUGIN_NETS = """
import flax.linen as nn
from flax import nnx

class Dense(nn.Module):
    features: int
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        if self.rate:
            x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(self.features)(x)

class NnxDropout(nnx.Module):
    def __init__(self, num_classes, rngs):
        self.dense = nnx.Linear(20, num_classes, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.dense(x))

class Normalized(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.Dense(self.features)(x)

def tiny(input_shape, num_classes):
    return Dense(num_classes)

def one_layer(input_shape, num_classes):   # params {kernel, bias}: no top-level modules
    return nn.Dense(num_classes)

def batchnorm(input_shape, num_classes):
    return Normalized(num_classes)

def not_a_module(input_shape, num_classes):
    return {"layers": 2}

def three_outputs(input_shape, num_classes):
    return Dense(3)

def dropout(input_shape, num_classes):
    return Dense(num_classes, rate=0.1)

def nnx_dropout(input_shape, num_classes, rngs):
    return NnxDropout(num_classes, rngs)
"""


class _MakesADirectory:
    """A crafted pickle: loading it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _data_files(folder: Path, kind: str) -> None:
    """An .npz broken one way (or a CIFAR-10 batch that would run code) in folder."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 20)), rng.integers(0, 10, 100)
    arrays = {"no_y": dict(x=x), "no_x": dict(y=y), "label_10": dict(x=x, y=y + 1),
              "nan": dict(x=np.where(x > 2, np.nan, x), y=y), "small": dict(x=x[:32], y=y[:32]),
              "objects": dict(x=np.array([None] * 100, dtype=object), y=y)}
    if kind == "evil":   # cifar: the batch's data would create root/pwned
        batch = {b"data": _MakesADirectory(folder.parent / "pwned"), b"labels": [0]}
        (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    else:
        np.savez(folder / "mine.npz", **arrays[kind])


def _plugin_files(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "nets.py").write_text(PLUGIN_NETS)
    (folder / "broken.py").write_text("import not_installed_anywhere\n")


def _finished_plugin_run(workdir: Path, data: Path) -> None:
    """A finished 2-step run of nets.py:tiny, whose file is then edited."""
    result = run_module("experiments.train", *TINY, "--steps=2", f"--model={data}/nets.py:tiny",
                        f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    (data / "nets.py").write_text(PLUGIN_NETS.replace("nn.Dense(8)", "nn.Dense(9)"))


def prepare(case: Case, root: Path, finished: Path | None) -> dict:
    """Builds the case's folder under root; returns the placeholders of its args."""
    root.mkdir(parents=True, exist_ok=True)
    places = {"w": root / "run", "d": root / "data", "missing": root / "nowhere"}
    workdir = places["w"]
    if case.setup == "file":
        workdir.write_text("a file, not a folder\n")
    elif case.setup == "notes":
        workdir.mkdir()
        (workdir / "notes.txt").write_text("precious\n")
    elif case.setup == "finished":
        shutil.copytree(finished, workdir)
    elif case.setup == "killed_at_start":
        # What a kill -9 during compilation leaves: config.json and an empty checkpoints/.
        workdir.mkdir()
        shutil.copy2(finished / records.CONFIG_FILE, workdir / records.CONFIG_FILE)
        (workdir / records.CHECKPOINT_DIR).mkdir()
    elif case.setup == "plugins":
        _plugin_files(places["d"])
    elif case.setup == "plugins:finished":
        _plugin_files(places["d"])
        _finished_plugin_run(workdir, places["d"])
    elif case.setup == "params:wrong":   # TINY's MLP params, one leaf the wrong shape
        places["d"].mkdir()
        shapes = {"Dense_0/kernel": (20, 8), "Dense_0/bias": (16,), "Dense_1/kernel": (16, 10),
                  "Dense_1/bias": (10,)}
        np.savez(places["d"] / "params.npz", **{k: np.zeros(v) for k, v in shapes.items()})
    elif case.setup.startswith(("npz:", "cifar:")):
        _data_files(places["d"], case.setup.split(":", 1)[1])
    elif case.setup.startswith("fmnist:"):
        _fake_fashion_mnist(places["d"], case.setup.split(":", 1)[1])
    elif case.setup != "absent":
        raise ValueError(case.setup)
    return {key: str(path) for key, path in places.items()}


def snapshot(root: Path) -> dict:
    """Every path under root (and root): type, mode, size, mtime and a hash of the contents."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(folder) / name if name != "." else Path(folder)
            info = path.lstat()
            entry = (stat.S_IFMT(info.st_mode), info.st_mode, info.st_size, info.st_mtime_ns)
            if stat.S_ISREG(info.st_mode):
                entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            tree[str(path.relative_to(root))] = entry
    return tree


# ----------------------------------------------------------------------------
# Running the programs: a fork server, and fresh interpreters for the cross-check
# ----------------------------------------------------------------------------

FORK_SERVER = r'''
import json, os, runpy, signal, sys, time, traceback
import jax                                      # imported, no backend started
from lossland import cli, experiment, plots, runner   # the programs' heavy imports
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    start = time.time()
    pid = os.fork()
    if pid == 0:   # the child: the program, as `python -m MODULE ARGS` runs it
        code = 1
        try:
            os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            if request["backend"]:
                jax.default_backend = lambda: request["backend"]
            sys.argv = [request["module"], *request["argv"]]
            try:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - start > request["timeout"]:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                      "seconds": time.time() - start}), flush=True)
'''


@dataclasses.dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    before: dict = dataclasses.field(default_factory=dict)
    after: dict = dataclasses.field(default_factory=dict)
    root: str = ""

    def message(self) -> str:
        """stderr without log lines, the case's folder written as <root>."""
        lines = [line for line in self.stderr.splitlines() if not LOG_LINE.match(line)]
        return "\n".join(lines).replace(self.root, "<root>")


def program_env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")


class ForkServer:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=REPO,
                                        env=program_env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, module: str, argv, backend: str = "") -> Outcome:
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        request = {"module": module, "argv": list(argv), "backend": backend,
                   "stdout": str(out), "stderr": str(err), "timeout": CASE_TIMEOUT_S}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        return Outcome(reply["returncode"], out.read_text(), err.read_text(), reply["seconds"])

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def run_fresh(module: str, argv) -> Outcome:
    start = time.time()
    result = run_module(module, *argv, timeout=CASE_TIMEOUT_S, env_extra={"JAX_LOG_COMPILES": "1"})
    return Outcome(result.returncode, result.stdout, result.stderr, time.time() - start)


def run_case(case: Case, root: Path, finished: Path | None, launch) -> Outcome:
    places = prepare(case, root, finished)
    argv = [arg.format(**places) for arg in case.args]
    before = snapshot(root)
    outcome = launch(case.module, argv, case.backend)
    outcome.before, outcome.after, outcome.root = before, snapshot(root), str(root)
    return outcome


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    forks = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def finished_run(server, tmp_path_factory):
    """A real finished run of the TINY setting (the resume cases start from copies of it)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    outcome = server.run("experiments.train", [*TINY, f"--workdir={workdir}"])
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert records.read_metrics(workdir)[-1]["status"] == "finished"
    return workdir, outcome


def _selected_cases(session) -> list[str]:
    """The case ids this session runs (all of them, or those -k picked)."""
    return [item.callspec.params["case"].id for item in session.items
            if getattr(item, "originalname", "") == "test_bad_input_is_refused"]


@pytest.fixture(scope="module")
def outcomes(request, server, finished_run, tmp_path_factory):
    """Every selected case, run one after the other through the fork server."""
    selected = set(_selected_cases(request.session))
    results = {}
    for case in CASES:
        if case.id in selected:
            results[case.id] = run_case(case, tmp_path_factory.mktemp(case.id), finished_run[0],
                                        server.run)
    return results


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------

def check_refused(case: Case, outcome: Outcome) -> None:
    where = f"{case.id}: rc={outcome.returncode}\n{outcome.stderr[-3000:]}"
    assert outcome.returncode != 0, where
    assert "Traceback" not in outcome.stderr, where
    for text in case.expect:
        assert text in outcome.message(), f"{text!r} not in the message of {where}"
    assert not COMPILE_LOG.search(outcome.stderr), f"compiled before refusing: {where}"
    assert outcome.seconds < FAST_S, f"{outcome.seconds:.1f} s: {where}"
    assert outcome.after == outcome.before, f"the folder changed: {where}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_is_refused(case, outcomes):
    check_refused(case, outcomes[case.id])


def test_catalog_size_and_coverage():
    assert len(CASES) >= 25
    modules = {case.module for case in CASES}
    assert modules == {"experiments.train", "experiments.sweep_n", "experiments.eos",
                       "experiments.subspace", "experiments.reproduce", "experiments.analyze"}
    # Every numeric flag of the driver has an out-of-range case.
    from lossland import config as config_lib
    numeric = [name for name, field in config_lib.RunConfig.__dataclass_fields__.items()
               if field.type in ("int", "float")]
    tried = {arg.split("=")[0][2:] for case in CASES if case.module == "experiments.train"
             for arg in case.args[len(TINY):]}
    assert not [name for name in numeric if name not in tried]


def test_fork_server_sees_compilation(finished_run):
    """The positive control: the same server and log setting show a valid run compiling."""
    _, outcome = finished_run
    assert outcome.returncode == 0 and COMPILE_LOG.search(outcome.stderr)


def test_fresh_interpreters_agree(server, finished_run, tmp_path):
    """A sample of cases, one per kind of refusal, run both ways: same exit code and message."""
    cases = [case for case in CASES if case.id in FRESH_SAMPLE]
    assert len(cases) == len(FRESH_SAMPLE)
    forked = {case.id: run_case(case, tmp_path / "forked" / case.id, finished_run[0], server.run)
              for case in cases}
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        fresh = dict(zip([case.id for case in cases], pool.map(
            lambda case: run_case(case, tmp_path / "fresh" / case.id, finished_run[0],
                                  lambda module, argv, _: run_fresh(module, argv)), cases)))
    for case in cases:
        check_refused(case, fresh[case.id])
        assert fresh[case.id].returncode == forked[case.id].returncode, case.id
        assert fresh[case.id].message() == forked[case.id].message(), case.id


# --- refusals of the API (no command line reaches them with the registry's models) ----------

def test_track_layers_refuses_params_without_layers():
    """--track_layers with a model whose params have no top-level modules (e.g. a user
    model with bare arrays): a ConfigError naming the flag, from shapes alone."""
    import jax
    from lossland import config as config_lib
    cfg = config_lib.RunConfig(track_layers=True, track_every=1, model="mlp")
    shapes = {"w": jax.ShapeDtypeStruct((40, 10), np.float32),
              "b": jax.ShapeDtypeStruct((10,), np.float32)}
    with pytest.raises(config_lib.ConfigError, match=r"--track_layers=True .*bare arrays"
                       r".*drop --track_layers"):
        config_lib.validate_layers(cfg, shapes)
    config_lib.validate_layers(cfg.replace(track_layers=False), shapes)   # off: no check


def test_a_name_filter_that_matches_nothing_names_it_and_the_choices():
    import jax
    from lossland.curvature import select_params
    shapes = {"Dense_0": {"kernel": jax.ShapeDtypeStruct((4, 3), np.float32),
                          "bias": jax.ShapeDtypeStruct((3,), np.float32)}}
    with pytest.raises(ValueError, match=r"regex='\^Conv'.*matches no parameter.*"
                       r"\['Dense_0/bias', 'Dense_0/kernel'\]"):
        select_params(shapes, regex="^Conv")
