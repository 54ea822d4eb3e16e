"""The training layer: a YAML config (``config``) turned into a checked run (``setup``), the
loop (``trainer``), ``--elastic`` around it (``elastic``), checkpoints, metrics, plots and the
demo. Modules are imported by the command that needs them; this package imports nothing.
"""
