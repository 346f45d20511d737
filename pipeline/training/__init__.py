"""Training's parts: the plan, the trainer set-up, CPU speed-ups, checkpoints, several processes."""
