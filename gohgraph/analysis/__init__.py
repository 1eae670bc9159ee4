"""Analysis of models and runs: routing statistics, timing, Student-t quantiles. Below training,
which logs routing statistics; the comparison of variants, which runs the trainer, is gohgraph.experiments."""
