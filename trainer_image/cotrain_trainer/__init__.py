"""CoTrain trainer: runs a job's PyTorch and TensorFlow members side by side on one device.

Importing this package imports no ML framework; each member process imports its own.
"""
