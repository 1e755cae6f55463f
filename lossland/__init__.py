"""lossland: loss-landscape geometry along training trajectories (see README.md, Architecture).

`lossland.Tracker` tracks the top Hessian eigenpairs in your own training loop
(`lossland.tracker`); it is imported on first use, so `import lossland.data`
stays free of JAX start-up.
"""


def __getattr__(name):
    if name in ("Tracker", "TrackerResult", "TrackerState"):
        from lossland import tracker
        return getattr(tracker, name)
    raise AttributeError(f"module 'lossland' has no attribute {name!r}")
