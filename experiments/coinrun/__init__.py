"""Behavioural cloning on CoinRun (paper §3.3, App. B.6): a planning expert labels frames of Procgen's CoinRun,
a ResNet-18 is cloned from them with Adam or the temporal AND-mask Adam (Algorithm 1), and a TPE search tunes both.

Modules: :mod:`.game` (the environment, its actions and the saved states), :mod:`.expert` (the Monte-Carlo
planning expert), :mod:`.labels` (per-level label files and the labelling run); the cloning, search and figure
modules build on them. ``docs/experiments.md`` describes the commands and the choices.
"""
