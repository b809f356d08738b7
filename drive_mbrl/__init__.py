"""drive_mbrl: model-based reinforcement learning for driving planners on highway-env.

The package is flat (see ARCHITECTURE.md): `scenarios` builds environments, `tracking` turns the simulator's
vehicles into tracks with stable ids, `data` collects and stores episodes, `evaluate` measures drivers, and `cli`
is the only place that knows Hydra. Nothing heavy is imported here, so `import drive_mbrl` is cheap.
"""

__version__ = "0.1.0"

SCHEMA_VERSION = 1
"""Version of the on-disk formats (episode files, dataset manifest). Bumped on any incompatible change."""
