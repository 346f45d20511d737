"""Evidence: baselines, metrics with intervals, statistics, plots, traces and the decision's inputs."""
