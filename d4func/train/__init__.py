"""Training: train state, steps per phase, online and offline loops."""
