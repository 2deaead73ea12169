"""The offline demo (`llavakit demo`): synthetic world, tiny backbones, both stages, scores.

Its two recipes ship with the package in `recipes/` (see `pipeline.recipes_dir`).
"""
