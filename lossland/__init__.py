"""lossland: loss-landscape geometry along training trajectories (see README.md, Architecture)."""
