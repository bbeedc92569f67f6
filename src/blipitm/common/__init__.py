"""Building blocks shared by sibling packages (retrieval, evaluation, filtering), in the spirit of
timm's ``layers/``: exact top-k, crash-safe file writes, progress callbacks, model identity and
the package version. Nothing here imports torch; import the submodule you need.
"""
