"""CoTrain operator: turns CoTrainJob resources into GPU-sharing pods.

Importing this package imports nothing else: the `api` subpackage is shared with the trainer,
which must not pull kopf.
"""
