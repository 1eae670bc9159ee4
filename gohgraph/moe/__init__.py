"""Expert feed-forward layers: dispatch (sort, group, combine), the experts themselves, the MoE layer."""
