"""Analysis of trained models: routing statistics, the fair comparison of variants, timing."""
