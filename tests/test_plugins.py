"""Plug-in models in the driver: `--model=pkg.module:callable` and `path/file.py:callable`."""

import json
import textwrap

import pytest

from lossland import config as config_lib, records, runner

TINY = dict(dataset="gaussian_mixture", n_train=64, steps=4, log_every=1, plots=False,
            track_every=2, track_k=2, lanczos_iters=10, checkpoint_every=2)

LINEN_FILE = textwrap.dedent("""
    import flax.linen as nn

    class Net(nn.Module):
        width: int
        num_classes: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.num_classes)(nn.tanh(nn.Dense(self.width)(x)))

    def make(input_shape, num_classes, width=8):
        return Net(width=width, num_classes=num_classes)
""")


def _rows(workdir):
    return [{k: v for k, v in r.items() if k not in runner.TIMING_KEYS}
            for r in records.read_metrics(workdir)]


def test_plugin_mlp_records_equal_builtin_bitwise(tmp_path):
    """The plug-in path costs nothing: the built-in MLP through it gives the same records."""
    builtin = config_lib.RunConfig(**TINY, model="mlp", width=16, depth=1,
                                   workdir=str(tmp_path / "builtin"))
    plugin = config_lib.RunConfig(**TINY, model="lossland.models:make_mlp",
                                  model_kwargs='{"width": 16, "depth": 1}',
                                  workdir=str(tmp_path / "plugin"))
    for cfg in (builtin, plugin):
        assert runner.run(cfg, progress=False).status == "finished"
    rows = _rows(tmp_path / "builtin")
    assert len(rows) == 5 and "eigenvalues" in rows[0]
    assert _rows(tmp_path / "plugin") == rows
    source = json.loads((tmp_path / "plugin" / "config.json").read_text())["model_source"]
    assert source["spec"] == "lossland.models:make_mlp"
    assert source["file"].endswith("families.py") and len(source["sha256"]) == 64


def test_resume_refuses_a_changed_model_file(tmp_path):
    model_file = tmp_path / "mynet.py"
    model_file.write_text(LINEN_FILE)
    cfg = config_lib.RunConfig(**{**TINY, "steps": 2}, model=f"{model_file}:make",
                               model_kwargs='{"width": 4}', workdir=str(tmp_path / "run"))
    assert runner.run(cfg, progress=False).status == "finished"
    assert not (tmp_path / "__pycache__").exists()   # importing the file wrote nothing there
    model_file.write_text(LINEN_FILE.replace("nn.tanh", "nn.relu"))
    with pytest.raises(config_lib.ConfigError, match=f"--model={model_file}:make changed"):
        runner.run(cfg.replace(steps=4, resume=True), progress=False)
    model_file.write_text(LINEN_FILE)   # restored: the resume goes on
    assert runner.run(cfg.replace(steps=4, resume=True), progress=False).status == "finished"


NNX_BN_FILE = textwrap.dedent("""
    import jax.numpy as jnp
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, din, width, num_classes, rngs):
            self.l1 = nnx.Linear(din, width, rngs=rngs)
            self.bn = nnx.BatchNorm(width, rngs=rngs)
            self.l2 = nnx.Linear(width, num_classes, rngs=rngs)

        def __call__(self, x, train: bool):
            return self.l2(jnp.tanh(self.bn(self.l1(x))))

    def make(input_shape, num_classes, rngs, width=8):
        return Net(input_shape[0], width, num_classes, rngs)
""")


def test_driver_tracks_an_nnx_batchnorm_plugin(tmp_path):
    """An NNX BatchNorm net in the driver: ghost batches of 32, tracked, checkpointed."""
    model_file = tmp_path / "nnx_bn.py"
    model_file.write_text(NNX_BN_FILE)
    cfg = config_lib.RunConfig(**{**TINY, "steps": 3}, model=f"{model_file}:make",
                               model_kwargs='{"width": 6}', chunk_size=32,
                               workdir=str(tmp_path / "run"))
    assert runner.run(cfg, progress=False).status == "finished"
    rows = records.read_metrics(tmp_path / "run")
    tracked = [r for r in rows if "eigenvalues" in r]
    assert [r["step"] for r in tracked] == [0, 2, 3]   # and the final row
    assert all(len(r["eigenvalues"]) == 2 and r["eigenvalues"][0] > 0 for r in tracked)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["num_params"] == (20 * 6 + 6) + 2 * 6 + (6 * 10 + 10)


NNX_DEEP_FILE = textwrap.dedent("""
    import jax.numpy as jnp
    from flax import nnx

    class Deep(nnx.Module):     # 12 listed layers: keys 0..11 must keep their order
        def __init__(self, din, num_classes, rngs):
            dims = [din] + [3 + i for i in range(12)]
            self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                    for a, b in zip(dims[:-1], dims[1:])])
            self.out = nnx.Linear(dims[-1], num_classes, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = jnp.tanh(layer(x))
            return self.out(x)

    def make(input_shape, num_classes, rngs):
        return Deep(input_shape[0], num_classes, rngs)
""")


def test_nnx_pure_apply_equals_the_module_call(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lossland import models
    from lossland.models import plugin

    model_file = tmp_path / "deep.py"
    model_file.write_text(NNX_DEEP_FILE)
    spec = f"{model_file}:make"
    model = models.build_model(spec, (4,), 3, key=jax.random.key(0))
    module = plugin.load_factory(spec)[0]((4,), 3, nnx.Rngs(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    assert jnp.array_equal(model.apply(model.params, x), module(x))
    assert model.num_params == models.count_params(spec, (4,), 3, width=0, depth=0,
                                                   activation="relu") == 1061
    assert list(model.params["layers"]) == list(range(12))
