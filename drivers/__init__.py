"""Device drivers: one service process per device (CPU, each CUDA GPU) that runs the model."""
